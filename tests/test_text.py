"""Transcript clean-up changes no word's meaning."""

from __future__ import annotations

import pytest

from launcher.text import clean_transcript, normalize_target, strip_punctuation


def test_clean_transcript_is_nfc_and_single_spaced_and_otherwise_untouched():
    decomposed = "Cafe\u0301  au\u00a0lait\u200b,\t« s'il vous plaît ! »\n"
    assert clean_transcript(decomposed) == "Café au lait, « s'il vous plaît ! »"


@pytest.mark.parametrize("text, expected", [
    ("It's John's book, isn't it?", "it's john's book isn't it"),
    ("Aujourd’hui, l'homme est peut-être là.", "aujourd'hui l'homme est peut-être là"),
    ("Il a payé 3,5 euros à 10:30.", "il a payé 3,5 euros à 10:30"),
    ("« Bonjour » — dit-elle...", "bonjour dit-elle"),
    ("'Quoted' words -- and - dashes", "quoted words and dashes"),
    ("Größe STRASSE", "größe strasse"),
])
def test_normalize_target_lowercases_and_strips_punctuation_but_keeps_words(text, expected):
    assert normalize_target(text) == expected


def test_strip_punctuation_keeps_case():
    assert strip_punctuation("Hello, World! It's 5.") == "Hello World It's 5"
