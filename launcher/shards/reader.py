"""Reading shards: the one tar reader of training (`launcher.data`) and evaluation (`launcher.evaluation`)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from launcher.shards.format import MEL, META


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


def read_samples(path: Path | BinaryIO, wanted: Sequence[int] | None = None, *,
                 load_mel: bool = True) -> Iterator[TarSample]:
    """The samples at the sorted in-shard positions `wanted` (all when None), seeking over the others, from a shard's
    path or an open binary file (`fetch.ShardFetcher.open`: one still arriving). With `load_mel=False` only the JSON
    is read and the features are located (`mel_ref`), not loaded.

    A truncated or corrupt tar, a sample missing a member, or bytes that never arrive raise BadShard naming the shard
    and the last key."""
    if wanted is not None and not len(wanted):
        return
    last = wanted[-1] if wanted is not None else None
    lookup = wanted if wanted is None or isinstance(wanted, range) else set(np.asarray(wanted).tolist())
    position, key, parts, delivered = -1, None, {}, 0
    file = path if hasattr(path, "read") else None
    path = Path(file.name) if file is not None else path
    try:
        with tarfile.open(path if file is None else None, "r:", fileobj=file) as tar:
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
    except BadShard as e:  # a remote shard's bytes stopped coming or were not its own
        raise BadShard(f"{e} (after key {key!r})", len(wanted) - delivered if wanted is not None else 0) from None
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped = len(wanted) - delivered if wanted is not None else 0
        raise BadShard(f"shard {path} is unreadable after key {key!r}: {type(e).__name__}: {e}", skipped) from None
    if wanted is not None and delivered < len(wanted):
        raise BadShard(f"shard {path} gave {delivered} of the {len(wanted)} samples index.json promises here "
                       f"(last key {key!r})", skipped=len(wanted) - delivered)


