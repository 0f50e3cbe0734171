"""Transcript clean-up: what shards store, what the model is trained on, and what scoring compares.

Three levels, each changing no word's meaning:

- `clean_transcript` (shard time): Unicode NFC, invisible format characters removed, any run of
  whitespace made one space. The sentence is otherwise stored as the source wrote it, so the choice
  of training target stays open until train time.
- `normalize_target` (train time, optional): lower-case and punctuation removed, the event's rule, but
  word-internal apostrophes and hyphens ("it's", "aujourd'hui", "peut-être") and separators inside
  numbers ("3,5", "10:30") are kept, since removing them changes or merges words.
- scoring normalisers live with the evaluation and follow the event exactly (BasicTextNormalizer).
"""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
_APOSTROPHES = "'\u2019\u02bc"  # ' ’ ʼ  (typographic variants are written as ')
_HYPHENS = "-\u2010\u2011"


def clean_transcript(text: str) -> str:
    """NFC, no control or zero-width characters, single spaces, no leading or trailing space."""
    text = unicodedata.normalize("NFC", text)
    kept = (" " if ch.isspace() else ch for ch in text
            if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf"))
    return _WHITESPACE.sub(" ", "".join(kept)).strip()


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or unicodedata.category(ch).startswith("M")


def strip_punctuation(text: str) -> str:
    """Remove punctuation that carries no word: keep word-internal apostrophes and hyphens and
    separators between digits; everything else of Unicode category P becomes a space."""
    out = []
    for i, ch in enumerate(text):
        if not unicodedata.category(ch).startswith("P"):
            out.append(ch)
            continue
        before = text[i - 1] if i > 0 else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        if ch in _APOSTROPHES and _is_word_char(before) and _is_word_char(after):
            out.append("'")
        elif ch in _HYPHENS and _is_word_char(before) and _is_word_char(after):
            out.append("-")
        elif ch in ".,:" and before.isdigit() and after.isdigit():
            out.append(ch)
        else:
            out.append(" ")
    return _WHITESPACE.sub(" ", "".join(out)).strip()


def normalize_target(text: str) -> str:
    """Lower-case, punctuation removed per `strip_punctuation`: the event's allowed target clean-up."""
    return strip_punctuation(clean_transcript(text).lower())
