"""The shard format's contract (format "whisper-shards/1"): index.json, the members of a sample, sha256.

Read tolerantly (unknown keys are allowed), written strictly:

    OUT/index.json      format, features (n_mels, sampling_rate, n_fft, hop_length, dtype, frames), source (what
                        was read, language), splits (samples, seconds, shards: path relative to OUT, samples,
                        seconds, bytes, sha256, pieces), dropped (count by reason)
    OUT/dropped.jsonl   one line per dropped clip: id, split, reason, detail
    OUT/<split>/*.tar   WebDataset tars; one sample = KEY.mel.npy (float16 [n_mels, frames], unpadded) + KEY.json
                        (id, text, lang, seconds[, speaker]); .npy is loaded with allow_pickle=False, nothing is
                        unpickled

A shard's `pieces` ({"bytes": 4 MiB, "sha256": [one per piece]}) let a reader check bytes as they arrive from a URL
and read them before the rest of the shard is there (`fetch.ShardFetcher`); sets written before pieces existed have
none and are checked whole before they are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LauncherError
from launcher.shards.location import Location, is_url

FORMAT = "whisper-shards/1"
INDEX_FILE = "index.json"
DROPPED_FILE = "dropped.jsonl"
PIECE_BYTES = 4 << 20  # a shard's bytes are checked (and can be read from a URL) a piece at a time
MEL = "mel.npy"  # member suffixes of one sample: KEY.mel.npy and KEY.json
META = "json"


def sample_key(clip_id: str) -> str:
    """A WebDataset key for an id: no dots (they start the member suffix) and no path separators. Ids that need
    changing get a short hash of the original, so distinct ids never share a key."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", clip_id)
    return safe if safe == clip_id else f"{safe}-{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(path: Path, piece: int = PIECE_BYTES) -> tuple[str, Pieces]:
    """A file's sha256 and its pieces' (one read)."""
    whole, hashes = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(piece):
            whole.update(block)
            hashes.append(hashlib.sha256(block).hexdigest())
    return whole.hexdigest(), Pieces(piece, tuple(hashes))


@dataclass(frozen=True)
class Pieces:
    """A shard's bytes in pieces of `size` (the last one shorter), each with its sha256."""

    size: int
    sha256: tuple[str, ...]

    def entry(self) -> dict:
        return {"bytes": self.size, "sha256": list(self.sha256)}

    @classmethod
    def from_entry(cls, entry: dict | None, shard_bytes: int | None, where: str) -> Pieces | None:
        if entry is None:
            return None
        try:
            pieces = cls(int(entry["bytes"]), tuple(str(h) for h in entry["sha256"]))
        except (TypeError, KeyError, ValueError) as e:
            raise LauncherError(f"{where}: malformed pieces ({type(e).__name__}: {e})") from None
        if pieces.size <= 0 or shard_bytes is None or len(pieces.sha256) != max(1, -(-shard_bytes // pieces.size)):
            raise LauncherError(f"{where}: {len(pieces.sha256)} pieces of {pieces.size} bytes do not cover the "
                                f"shard's {shard_bytes} bytes")
        return pieces


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as index.json lists it: an absolute path, or the URL of a remote set's shard (read through
    `fetch.ShardFetcher`)."""

    path: Path | str
    samples: int
    seconds: float = 0.0
    bytes: int | None = None
    sha256: str | None = None
    pieces: Pieces | None = None

    @property
    def remote(self) -> bool:
        return is_url(self.path)

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def problem(self, hash_it: bool = True) -> str | None:
        """None if the file exists with the index's size (and sha256, when `hash_it`), else what is wrong, worded
        to follow the shard's name. A local file's: a remote shard's is `fetch.problem`'s."""
        if not self.path.is_file():
            return "is missing"
        size = self.path.stat().st_size
        if self.bytes is not None and size != self.bytes:
            return f"has {size} bytes, index.json says {self.bytes}"
        if hash_it and self.sha256 and sha256_file(self.path) != self.sha256:
            return "does not match its sha256 in index.json"
        return None


@dataclass(frozen=True)
class ShardIndex:
    """index.json, read once and passed to whoever needs the shards (recipe checks, loader, evaluation, card)."""

    folder: Path | str  # a local folder, or a URL
    data: dict

    @property
    def location(self) -> Location:
        return Location.of(self.folder)

    @property
    def n_mels(self) -> int | None:
        return self.data["features"].get("n_mels")

    @property
    def source(self) -> dict:
        return self.data.get("source") or {}

    @property
    def language(self) -> str | None:
        return self.source.get("language")

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def has_split(self, split: str) -> bool:
        return split in self.data["splits"]

    def _split(self, split: str) -> dict:
        if split not in self.data["splits"]:
            raise LauncherError(f"{self.location.join(INDEX_FILE)} has no split {split!r} (it has: "
                                f"{', '.join(self.data['splits'])})")
        return self.data["splits"][split]

    def samples(self, split: str) -> int:
        return self._split(split)["samples"]

    def relative(self, shard: Shard) -> str:
        """A shard's path within the set, as index.json names it (for messages)."""
        return shard.url.removeprefix(str(self.folder)).lstrip("/")

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in index order, empty ones included (positions count through them)."""
        where, out = self.location, []
        for s in self._split(split)["shards"]:
            path = where.join(s["path"])
            out.append(Shard(path if where.remote else Path(path), s["samples"], s.get("seconds", 0.0), s.get("bytes"),
                             s.get("sha256"), Pieces.from_entry(s.get("pieces"), s.get("bytes"),
                                                                f"{where.join(INDEX_FILE)}: shard {s['path']}")))
        return out


def load_index(folder: Path | str) -> ShardIndex:
    """Read and check OUT/index.json (OUT a folder or a URL); unknown extra keys are allowed (readers are tolerant).
    A set is whole once its index.json exists: writers put it last."""
    where = Location.of(folder)
    path = where.join(INDEX_FILE)
    if not where.remote and not Path(path).is_file():
        raise LauncherError(f"{path} does not exist: run `python -m launcher shard` first, or point at the folder "
                            "that holds index.json")
    try:
        data = json.loads(where.read_bytes(INDEX_FILE).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise LauncherError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LauncherError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    for key in ("features", "splits"):
        if not isinstance(data.get(key), dict):
            raise LauncherError(f"{path}: missing or malformed {key!r}")
    return ShardIndex(where.root if where.remote else Path(folder), data)


def features_entry(n_mels: int) -> dict:
    """index.json's `features`: what the stored log-mel is and how to pad it back to Whisper's window."""
    from launcher import features

    return {"n_mels": n_mels, "sampling_rate": features.SAMPLE_RATE, "n_fft": features.N_FFT,
            "hop_length": features.HOP_LENGTH, "dtype": "float16", "frames": features.N_FRAMES,
            "padding": "unpadded; pad to frames with max(stored max - 2, -1.5)"}


def write_index(folder: Path, data: dict, dropped: list[dict]) -> None:
    """Write dropped.jsonl and then index.json (atomically: a reader never sees half an index)."""
    folder = Path(folder)
    with open(folder / DROPPED_FILE, "w", encoding="utf-8") as f:
        for row in dropped:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp = folder / f"{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, **data}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / INDEX_FILE)
