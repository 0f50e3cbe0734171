"""The shard format's one owner: index.json, the members of a sample, the tar reader, sha256, `launcher inspect`.

Contract (format "whisper-shards/1"), read tolerantly (unknown keys are allowed), written strictly:

    OUT/index.json      format, features (n_mels, sampling_rate, n_fft, hop_length, dtype, frames), source (what
                        was read, language), splits (samples, seconds, shards: path relative to OUT, samples,
                        seconds, bytes, sha256), dropped (count by reason)
    OUT/dropped.jsonl   one line per dropped clip: id, split, reason, detail
    OUT/<split>/*.tar   WebDataset tars; one sample = KEY.mel.npy (float16 [n_mels, frames], unpadded) + KEY.json
                        (id, text, lang, seconds); .npy is loaded with allow_pickle=False, nothing is unpickled

`launcher.shard` writes shards; training (`launcher.data`) and evaluation (`launcher.evaluate`) read them through
`ShardIndex` and `read_samples` only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.errors import LauncherError

FORMAT = "whisper-shards/1"
INDEX_FILE = "index.json"
DROPPED_FILE = "dropped.jsonl"
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


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as index.json lists it (path made absolute)."""

    path: Path
    samples: int
    seconds: float = 0.0
    bytes: int | None = None
    sha256: str | None = None

    def problem(self, hash_it: bool = True) -> str | None:
        """None if the file exists with the index's size (and sha256, when `hash_it`), else what is wrong, worded
        to follow the shard's name."""
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

    folder: Path
    data: dict

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
            raise LauncherError(f"{self.folder / INDEX_FILE} has no split {split!r} (it has: "
                                f"{', '.join(self.data['splits'])})")
        return self.data["splits"][split]

    def samples(self, split: str) -> int:
        return self._split(split)["samples"]

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in index order, empty ones included (positions count through them)."""
        return [Shard(self.folder / s["path"], s["samples"], s.get("seconds", 0.0), s.get("bytes"), s.get("sha256"))
                for s in self._split(split)["shards"]]


def load_index(folder: Path) -> ShardIndex:
    """Read and check OUT/index.json; unknown extra keys are allowed (readers are tolerant)."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise LauncherError(f"{path} does not exist: run `python -m launcher shard` first, or point at the folder "
                            "that holds index.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LauncherError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LauncherError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    for key in ("features", "splits"):
        if not isinstance(data.get(key), dict):
            raise LauncherError(f"{path}: missing or malformed {key!r}")
    return ShardIndex(folder, data)


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


# ---- reading samples -----------------------------------------------------------------------------------------

class BadShard(Exception):
    """A shard (or part of one) that cannot be read; `skipped` samples are lost with it."""

    def __init__(self, message: str, skipped: int):
        super().__init__(message)
        self.skipped = skipped


@dataclass(frozen=True)
class MelRef:
    """Where a sample's features lie in its tar: read later, e.g. by the rank that decodes it."""

    path: Path
    offset: int
    size: int

    def load(self) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return load_mel(f.read(self.size))


@dataclass(frozen=True)
class TarSample:
    position: int  # the sample's place in its shard, from 0
    key: str
    meta: bytes  # KEY.json
    mel: bytes | None  # KEY.mel.npy, None when read with load_mel=False
    mel_ref: MelRef


def mel_frames(data: bytes) -> int:
    """Frames of a stored log-mel, from its .npy header alone (nothing decoded)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    shape, _, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                   np.lib.format.read_array_header_2_0)(buf)
    if len(shape) != 2:
        raise ValueError(f"features must be [n_mels, frames], got shape {shape}")
    return int(shape[1])


def load_mel(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_samples(path: Path, wanted: Sequence[int] | None = None, *, load_mel: bool = True) -> Iterator[TarSample]:
    """The samples at the sorted in-shard positions `wanted` (all when None), seeking over the others. With
    `load_mel=False` only the JSON is read and the features are located (`mel_ref`), not loaded.

    A truncated or corrupt tar, or a sample missing a member, raises BadShard naming the shard and the last key."""
    if wanted is not None and not len(wanted):
        return
    last = wanted[-1] if wanted is not None else None
    lookup = wanted if wanted is None or isinstance(wanted, range) else set(np.asarray(wanted).tolist())
    position, key, parts, delivered = -1, None, {}, 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                k, _, ext = member.name.partition(".")
                if k != key:
                    position, key, parts = position + 1, k, {}
                    if last is not None and position > last:
                        break
                if (lookup is not None and position not in lookup) or ext not in (MEL, META):
                    continue
                if ext == MEL:
                    parts["ref"] = MelRef(Path(path), member.offset_data, member.size)
                if ext == META or load_mel:
                    parts[ext] = tar.extractfile(member).read()
                if META in parts and "ref" in parts:
                    delivered += 1
                    yield TarSample(position, key, parts[META], parts.get(MEL), parts["ref"])
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped = len(wanted) - delivered if wanted is not None else 0
        raise BadShard(f"shard {path} is unreadable after key {key!r}: {type(e).__name__}: {e}", skipped) from None
    if wanted is not None and delivered < len(wanted):
        raise BadShard(f"shard {path} gave {delivered} of the {len(wanted)} samples index.json promises here "
                       f"(last key {key!r})", skipped=len(wanted) - delivered)


# ---- `launcher inspect` --------------------------------------------------------------------------------------

def inspect(folder: Path, verify: bool = False) -> int:
    """Print splits, samples, hours, bytes per audio hour and drops; with verify, check every shard's sha256.
    Returns the number of bad shards."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    index = load_index(folder)
    console = Console()
    feats, src = index.data["features"], index.source
    console.print(f"[bold]{folder}[/]  {index.data['format']}  n_mels={feats.get('n_mels')}  "
                  f"source={src.get('kind')}:{src.get('location')}  language={src.get('language')}")
    table = Table("split", "samples", "hours", "shards", "MB", "MB per audio hour", "mean s/clip")
    for name, split in index.data["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        hours = split["seconds"] / 3600
        table.add_row(name, f"{split['samples']:,}", f"{hours:.3f}", str(len(split["shards"])), f"{size / 1e6:.1f}",
                      f"{size / 1e6 / hours:.1f}" if hours else "-",
                      f"{split['seconds'] / split['samples']:.2f}" if split["samples"] else "-")
    console.print(table)
    dropped = index.data.get("dropped", {})
    if dropped:
        console.print(f"dropped {sum(dropped.values())}: " + ", ".join(f"{r} {n}" for r, n in sorted(dropped.items()))
                      + f"  (one line each in {Path(folder) / DROPPED_FILE})")
    else:
        console.print("dropped: none")
    if not verify:
        return 0
    shards = [s for split in index.split_names for s in index.shards(split)]
    bad = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying sha256", total=sum(s.bytes or 0 for s in shards))
        for shard in shards:
            problem = shard.problem()
            if problem:
                bad.append((shard.path.relative_to(index.folder), problem))
            progress.advance(task, shard.bytes or 0)
    for path, problem in bad:
        console.print(f"[red]BAD[/] {path}: {problem}")
    console.print(f"verified {len(shards)} shards: " + ("[green]all match index.json[/]" if not bad
                                                          else f"[red]{len(bad)} bad[/]"))
    return len(bad)
