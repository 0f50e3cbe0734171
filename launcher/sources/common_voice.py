"""Common Voice, in its two layouts: Mozilla's release folders and the Hugging Face Hub repository.

Both have the Common Voice 11 TSV columns (client_id, path, sentence, ...); `dev.tsv` is our validation.
The hub repository (mozilla-foundation/common_voice_11_0) keeps `transcript/<lang>/<split>.tsv` and the
MP3 clips in `audio/<lang>/<split>/<lang>_<split>_<i>.tar`. Its loading script no longer runs with
datasets >= 4, so the tars are streamed member by member through fsspec (HfFileSystem for hf://,
the local file system for a mirror), never unpacked to disk; the same code reads both.
"""

from __future__ import annotations

import csv
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import fsspec

from launcher.errors import LauncherError
from launcher.sources.base import Clip, clip_id, natural_key, read_clip

CV_SPLIT_FILES = {"train": "train", "validation": "dev", "test": "test"}
REQUIRED_COLUMNS = ("path", "sentence")


def read_tsv(text: str, origin: str) -> Iterator[tuple[int, str, str, str | None] | Clip]:
    """Rows of a Common Voice TSV as (line, path, sentence, client_id or None); a malformed row comes back as a Clip
    with a problem naming the file and line, so it is counted, not lost."""
    reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise LauncherError(f"{origin}: no {' or '.join(missing)} column in the header "
                            f"(found: {', '.join(reader.fieldnames or []) or 'nothing'}); is this a Common Voice TSV?")
    n_fields = len(reader.fieldnames)
    for row in reader:
        line = reader.line_num
        if row.get("path") is None or row.get("sentence") is None or None in row:
            got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
            yield Clip(id=f"{origin}:{line}", text="", audio=None, origin=f"{origin}:{line}",
                       problem=("bad_tsv_row", f"{origin} line {line}: expected {n_fields} tab-separated fields, "
                                               f"got {got}"))
            continue
        yield line, row["path"], row["sentence"], row.get("client_id") or None


class CommonVoiceRelease:
    """A Common Voice release language folder: clips/*.mp3 and train/dev/test.tsv (or its parent + --lang)."""

    def __init__(self, path: Path, lang: str):
        if not (path / "clips").is_dir() and (path / lang / "clips").is_dir():
            path = path / lang
        if not path.is_dir():
            raise LauncherError(f"Common Voice folder {path} does not exist")
        if not (path / "clips").is_dir():
            raise LauncherError(f"{path} has no clips/ folder: point --source at a Common Voice language folder")
        self.root, self.lang = path, lang
        found = [s for s, f in CV_SPLIT_FILES.items() if (path / f"{f}.tsv").is_file()]
        if not found:
            raise LauncherError(f"{path} has none of train.tsv, dev.tsv, test.tsv")
        self._splits = found

    def describe(self) -> dict:
        return {"kind": "cv", "location": str(self.root.resolve()), "language": self.lang}

    def splits(self) -> list[str]:
        return list(self._splits)

    def _tsv(self, split: str) -> Path:
        return self.root / f"{CV_SPLIT_FILES[split]}.tsv"

    def count(self, split: str) -> int | None:
        with open(self._tsv(split), "rb") as f:
            return max(0, sum(1 for _ in f) - 1)

    def clips(self, split: str) -> Iterator[Clip]:
        tsv = self._tsv(split)
        for row in read_tsv(tsv.read_text(encoding="utf-8"), tsv.name):
            if isinstance(row, Clip):
                yield row
                continue
            line, rel, sentence, speaker = row
            file = self.root / "clips" / rel
            origin = f"clips/{rel} ({tsv.name} line {line})"
            yield read_clip(file, clip_id(rel), sentence, origin, speaker=speaker)


def _hub_error(location: str, e: Exception) -> LauncherError:
    return LauncherError(
        f"cannot read {location}: {type(e).__name__}: {e}\n"
        "Common Voice 11 is gated: accept its terms on the dataset's Hugging Face page with your account, then "
        "set HF_TOKEN in the environment (or run `hf auth login`). Offline, give a local mirror with "
        "--source cv-hub:/path/to/folder (transcript/<lang>/*.tsv, audio/<lang>/<split>/*.tar).")


class CommonVoiceHub:
    """The hub repository's raw files (or a folder laid out the same way), read through fsspec."""

    def __init__(self, location: str, lang: str):
        if "://" not in location and not Path(location).exists() and location.count("/") == 1:
            location = f"hf://datasets/{location}"  # a bare repo id, OWNER/NAME
        self.location, self.lang = location, lang
        try:
            self.fs, self.root = fsspec.core.url_to_fs(location)
            present = [s for s in CV_SPLIT_FILES if self._has(self._tsv(s))]
        except Exception as e:  # noqa: BLE001 - hub, auth and network errors all end here with advice
            raise _hub_error(location, e) from None
        self._splits = present
        if not self._splits:
            raise LauncherError(f"{location}: no transcript/{lang}/{{train,dev,test}}.tsv; is {lang!r} a language of "
                                "this Common Voice release?")
        self._rows: dict[str, list] = {}

    def _has(self, path: str) -> bool:
        """Like fs.exists, but auth and network errors propagate (HfFileSystem.exists says False to them)."""
        try:
            self.fs.info(path)
            return True
        except FileNotFoundError:
            return False

    def describe(self) -> dict:
        loc = self.location if "://" in self.location else str(Path(self.location).resolve())
        return {"kind": "cv-hub", "location": loc, "language": self.lang}

    def splits(self) -> list[str]:
        return list(self._splits)

    def _tsv(self, split: str) -> str:
        return f"{self.root}/transcript/{self.lang}/{CV_SPLIT_FILES[split]}.tsv"

    def _read_rows(self, split: str) -> list:
        if split not in self._rows:
            try:
                with self.fs.open(self._tsv(split), "rb") as f:
                    text = f.read().decode("utf-8")
            except Exception as e:  # noqa: BLE001
                raise _hub_error(self._tsv(split), e) from None
            self._rows[split] = list(read_tsv(text, f"transcript/{self.lang}/{CV_SPLIT_FILES[split]}.tsv"))
        return self._rows[split]

    def count(self, split: str) -> int | None:
        return len(self._read_rows(split))

    def clips(self, split: str) -> Iterator[Clip]:
        cv_split = CV_SPLIT_FILES[split]
        wanted: dict[str, tuple[int, str, str | None]] = {}
        for row in self._read_rows(split):
            if isinstance(row, Clip):
                yield row
                continue
            line, rel, sentence, speaker = row
            name = PurePosixPath(rel).name
            if name in wanted:
                origin = f"{cv_split}.tsv line {line}"
                why = f"{origin} repeats {name} (first on line {wanted[name][0]})"
                yield Clip(clip_id(name), sentence, None, origin, ("duplicate", why))
                continue
            wanted[name] = (line, sentence, speaker)
        tars = sorted(self.fs.glob(f"{self.root}/audio/{self.lang}/{cv_split}/*.tar"), key=natural_key)
        seen: set[str] = set()
        for tar_path in tars:
            tar_name = PurePosixPath(tar_path).name
            try:
                with self.fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        name = PurePosixPath(member.name).name
                        data = tar.extractfile(member).read()
                        origin = f"{tar_name}:{member.name}"
                        if name not in wanted or name in seen:
                            why = "repeated in the tars" if name in seen else f"not in {cv_split}.tsv"
                            yield Clip(clip_id(name), "", None, origin, ("no_transcript", f"{origin}: {why}"))
                            continue
                        seen.add(name)
                        yield Clip(clip_id(name), wanted[name][1], data, origin, speaker=wanted[name][2])
            except (tarfile.TarError, OSError, EOFError) as e:
                yield Clip(tar_name, "", None, tar_name,
                           ("unreadable_tar", f"{tar_path}: {type(e).__name__}: {e}; clips after this point in "
                                              "the tar are reported as missing_audio"))
        for name, (line, sentence, _) in wanted.items():
            if name not in seen:
                yield Clip(clip_id(name), sentence, None, f"{cv_split}.tsv line {line}",
                           ("missing_audio", f"{name} ({cv_split}.tsv line {line}) is in no tar under "
                                             f"audio/{self.lang}/{cv_split}/"))
