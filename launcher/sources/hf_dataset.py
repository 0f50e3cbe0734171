"""Any Hugging Face dataset with an audio and a text column: a hub id or a local folder (parquet,
audiofolder, ...), streamed. The audio column is read undecoded and its bytes go through the project's own
decoder, so every source has one decode path. datasets >= 4 needs torchcodec (and FFmpeg's libraries) for
its Audio feature even with decode=False, so the column is cast to what it holds underneath: a
{bytes, path} struct (parquet, arrow) or a file path (audiofolder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from launcher.errors import LauncherError
from launcher.sources.base import SPLITS, Clip, clip_id

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "valid"), "test": ("test",)}
TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript", "normalized_text")


def _undecoded(ds, column: str):
    """`ds` with the audio column as stored: a {bytes, path} struct, or else a plain path string."""
    from datasets import Value

    for raw in ({"bytes": Value("binary"), "path": Value("string")}, Value("string")):
        cast = ds.cast_column(column, raw)
        try:
            next(iter(cast.take(1)), None)
            return cast
        except (AttributeError, TypeError, ValueError):
            continue
    raise LauncherError(f"audio column {column!r} holds neither {{bytes, path}} nor a file path")


class HFDataset:
    def __init__(self, name: str, config: str | None, *, audio_column: str | None = None,
                 text_column: str | None = None):
        import datasets

        self.name, self.config = name, config
        try:
            self._ds = datasets.load_dataset(name, config, streaming=True)
        except Exception as e:  # noqa: BLE001 - any loading failure ends here with the dataset named
            raise LauncherError(f"cannot load Hugging Face dataset {name!r}"
                                f"{f' (config {config!r})' if config else ''}: {type(e).__name__}: {e}") from None
        self._split_names = {}
        for split in SPLITS:
            for alias in SPLIT_ALIASES[split]:
                if alias in self._ds:
                    self._split_names[split] = alias
                    break
        if not self._split_names:
            raise LauncherError(f"dataset {name!r} has splits {list(self._ds)}, none of {', '.join(SPLITS)} "
                                "(or dev/valid)")
        first = self._ds[next(iter(self._split_names.values()))]
        columns = list(first.features or {})
        self.audio_column = audio_column or next((c for c in columns if type(first.features[c]).__name__ == "Audio"),
                                                 "audio")
        self.text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
        for what, col, flag in (("audio", self.audio_column, "--audio-column"), ("text", self.text_column,
                                                                                  "--text-column")):
            if col not in columns:
                raise LauncherError(f"dataset {name!r} has no {what} column {col!r} (columns: {', '.join(columns)}); "
                                    f"name it with {flag}")

    def _path_id(self, path: str) -> str:
        """A clip id from its file: the path inside a local dataset folder (audiofolder keeps train/a.wav and
        test/a.wav apart), else the file name without extension (Common Voice style, unique by itself)."""
        folder = Path(self.name).resolve()
        if Path(path).is_absolute() and folder.is_dir() and Path(path).is_relative_to(folder):
            return Path(path).relative_to(folder).with_suffix("").as_posix()
        return clip_id(path)

    def describe(self) -> dict:
        location = str(Path(self.name).resolve()) if Path(self.name).exists() else self.name
        return {"kind": "hf", "location": location, "config": self.config, "audio_column": self.audio_column,
                "text_column": self.text_column}

    def splits(self) -> list[str]:
        return list(self._split_names)

    def count(self, split: str) -> int | None:
        info = self._ds[self._split_names[split]].info
        split_info = (info.splits or {}).get(self._split_names[split]) if info else None
        return split_info.num_examples if split_info and split_info.num_examples else None

    def clips(self, split: str) -> Iterator[Clip]:
        name = self._split_names[split]
        for i, row in enumerate(_undecoded(self._ds[name], self.audio_column)):
            audio = row[self.audio_column] or {}
            audio = {"path": audio, "bytes": None} if isinstance(audio, str) else audio
            path = audio.get("path") or ""
            cid = str(row["id"]) if row.get("id") is not None else self._path_id(path) if path else f"{name}-{i:08d}"
            origin = f"{self.name}[{name}][{i}]" + (f" ({path})" if path else "")
            text = row.get(self.text_column)
            data = audio.get("bytes")
            if data is None and path and Path(path).is_file():
                data = Path(path).read_bytes()
            if data is None:
                why = f"{origin}: no audio bytes and no readable file"
                yield Clip(cid, text or "", None, origin, ("missing_audio", why))
            elif not isinstance(text, str):
                yield Clip(cid, "", None, origin, ("empty_text", f"{origin}: text column holds {text!r}"))
            else:
                speaker = row.get("client_id") or row.get("speaker_id") or row.get("speaker")
                yield Clip(cid, text, data, origin, speaker=str(speaker) if speaker is not None else None)
