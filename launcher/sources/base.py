"""What every corpus reader yields (`Clip`), the reader protocol (`Source`) and the helpers readers share."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Clip:
    """One utterance as the source has it. `origin` says where it came from, for messages."""

    id: str
    text: str
    audio: bytes | None
    origin: str
    problem: tuple[str, str] | None = None  # (drop reason, detail) when the source cannot supply the clip
    duration: float | None = None  # seconds, when the source states it (lets long clips drop before decoding)
    speaker: str | None = None  # who speaks (Common Voice's client_id): packing can join one speaker's clips


class Source(Protocol):
    def describe(self) -> dict:
        """What was read, for index.json (never a token)."""

    def splits(self) -> list[str]:
        """The splits this source has, among SPLITS."""

    def clips(self, split: str) -> Iterator[Clip]:
        """The clips of one split, always in the same order."""

    def count(self, split: str) -> int | None:
        """How many clips `clips(split)` will yield, if known cheaply (for the progress bar)."""


def clip_id(path: str) -> str:
    """A clip id from a file name: the name without its extension, so `common_voice_fr_1.mp3` ->
    `common_voice_fr_1`."""
    return Path(path).stem if "." in Path(path).name else Path(path).name


def read_clip(file: Path, cid: str, text: str, origin: str, duration: float | None = None,
              speaker: str | None = None) -> Clip:
    """A Clip with the file's bytes, or with the reason it cannot be read."""
    try:
        return Clip(cid, text, file.read_bytes(), origin, duration=duration, speaker=speaker or None)
    except FileNotFoundError:
        return Clip(cid, text, None, origin, ("missing_audio", f"{origin}: {file} does not exist"))
    except OSError as e:
        return Clip(cid, text, None, origin, ("unreadable_audio", f"{origin}: {file}: {e}"))


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
