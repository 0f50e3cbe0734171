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

from pathlib import Path

from launcher.errors import LauncherError
from launcher.sources.base import SPLITS, Clip, Source

__all__ = ["CV11_HUB", "SPLITS", "Clip", "Source", "open_source"]

CV11_HUB = "hf://datasets/mozilla-foundation/common_voice_11_0"


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
