"""Corpus readers. Every source yields `Clip`s per split, in a fixed order, with the audio still encoded.

Readers are tolerant: a clip the source cannot supply (missing file, bad TSV row, bad manifest line)
is still yielded, with `problem` set, so that the shard writer counts and lists it instead of losing it.
Errors that make the whole source unusable (no such folder, no TSV, gated repository) raise
LauncherError at open time, before any work starts.

Source specifications (`--source`):
  cv11 (default)        Common Voice 11 on the Hugging Face Hub, read from its raw TSV and tar files
  cv-hub:LOCATION       the same layout elsewhere: a local folder, or hf://datasets/OWNER/NAME
  cv:PATH               a Common Voice release folder (clips/ + train/dev/test.tsv), or its parent
  hf:NAME_OR_PATH       a Hugging Face dataset (parquet, audiofolder, ...) with audio and text columns
  manifest:FILE.jsonl   one JSON object a line: audio, text, optional id, split, duration
  PATH                  one of the above, recognised from what is there
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from launcher.errors import LauncherError

SPLITS = ("train", "validation", "test")
CV11_HUB = "hf://datasets/mozilla-foundation/common_voice_11_0"


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


def open_source(spec: str | None, lang: str, *, hf_config: str | None = None, audio_column: str | None = None,
                text_column: str | None = None) -> Source:
    """Parse a --source specification (see the module docstring) into a reader."""
    from launcher.sources.common_voice import CommonVoiceHub, CommonVoiceRelease
    from launcher.sources.hf_dataset import HFDataset
    from launcher.sources.manifest import Manifest

    spec = spec or "cv11"
    if spec == "cv11":
        return CommonVoiceHub(CV11_HUB, lang)
    if spec.startswith("hf://"):
        return CommonVoiceHub(spec, lang)
    kind, sep, location = spec.partition(":")
    if sep and kind == "cv-hub":
        return CommonVoiceHub(location, lang)
    if sep and kind == "cv":
        return CommonVoiceRelease(Path(location), lang)
    if sep and kind == "hf":
        return HFDataset(location, hf_config, audio_column=audio_column, text_column=text_column)
    if sep and kind == "manifest":
        return Manifest(Path(location), lang)
    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return Manifest(path, lang)
    if (path / "transcript").is_dir() and (path / "audio").is_dir():
        return CommonVoiceHub(str(path), lang)
    if (path / "clips").is_dir() or (path / lang / "clips").is_dir():
        return CommonVoiceRelease(path, lang)
    if path.is_dir():
        return HFDataset(str(path), hf_config, audio_column=audio_column, text_column=text_column)
    raise LauncherError(
        f"--source {spec!r}: no such file or folder. Give a Common Voice release folder (clips/ + train.tsv), "
        "a folder laid out like the hub's Common Voice repository (transcript/ + audio/), a Hugging Face "
        "dataset (hf:NAME or a folder of parquet/audio files), or a JSONL manifest.")
