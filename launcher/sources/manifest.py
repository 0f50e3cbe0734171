"""A JSONL manifest: one JSON object a line with `audio` (a path, relative to the manifest's folder or
absolute) and `text`, and optionally `id`, `split` (train, validation or dev, test; default train),
`duration` in seconds and `speaker` (any id; packing with `same_speaker` joins only one speaker's clips).
A line that is not such an object is reported with its line number, not skipped silently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import LauncherError
from launcher.sources.base import SPLITS, Clip, read_clip

ALIASES = {"dev": "validation", "valid": "validation"}


class Manifest:
    def __init__(self, path: Path, lang: str):
        if not path.is_file():
            raise LauncherError(f"manifest {path} does not exist")
        self.path, self.lang = path, lang
        self._entries: dict[str, list[tuple[int, dict | str]]] = {s: [] for s in SPLITS}
        bad = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            entry = self._parse(line, n)
            if isinstance(entry, str):
                bad.append((n, entry))
            else:
                self._entries[entry["split"]].append((n, entry))
        # A bad line has no trustworthy split: report it with the first split, where it is counted once.
        self._bad = bad

    def _parse(self, line: str, n: int) -> dict | str:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            return f"not JSON ({e.msg} at column {e.colno})"
        if not isinstance(entry, dict):
            return f"expected a JSON object, got {type(entry).__name__}"
        for field in ("audio", "text"):
            if not isinstance(entry.get(field), str):
                return f"field {field!r} must be a string, got {entry.get(field)!r}"
        split = ALIASES.get(entry.get("split", "train"), entry.get("split", "train"))
        if split not in SPLITS:
            return f"field 'split' must be one of train, validation (dev), test; got {entry.get('split')!r}"
        duration = entry.get("duration")
        if duration is not None and (not isinstance(duration, int | float) or duration < 0):
            return f"field 'duration' must be a number of seconds, got {duration!r}"
        entry["split"] = split
        return entry

    def describe(self) -> dict:
        return {"kind": "manifest", "location": str(self.path.resolve()), "language": self.lang}

    def splits(self) -> list[str]:
        present = [s for s in SPLITS if self._entries[s]]
        return present or (["train"] if self._bad else [])

    def count(self, split: str) -> int | None:
        return len(self._entries[split]) + (len(self._bad) if split == self.splits()[0] else 0)

    def clips(self, split: str) -> Iterator[Clip]:
        name = self.path.name
        if split == self.splits()[0]:
            for n, why in self._bad:
                origin = f"{name} line {n}"
                yield Clip(f"{name}:{n}", "", None, origin, ("bad_manifest_line", f"{origin}: {why}"))
        for n, entry in self._entries[split]:
            audio_path = Path(entry["audio"])
            file = audio_path if audio_path.is_absolute() else self.path.parent / audio_path
            cid = str(entry.get("id") or audio_path.with_suffix("").as_posix())
            origin = f"{name} line {n} ({entry['audio']})"
            yield read_clip(file, cid, entry["text"], origin, entry.get("duration"),
                            str(entry["speaker"]) if entry.get("speaker") is not None else None)
