"""Writing shards: size-capped, deterministic tars renamed into place when finished, and the journal that lets
an interrupted `launcher shard` resume (OUT/.journal/<split>.jsonl)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import LauncherError
from launcher.shards.format import Shard, file_hashes

TAR_BLOCK = 512


@dataclass(frozen=True)
class Drop:
    split: str
    item: int  # position of the clip in the source's split, for a stable order in dropped.jsonl
    id: str
    reason: str
    detail: str


def tar_member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class ShardWriter:
    """Writes samples into size-capped, deterministic tars; a finished shard is atomically renamed into place."""

    def __init__(self, out: Path, split: str, first_shard: int, max_bytes: int):
        self.out, self.split, self.max_bytes = out, split, max_bytes
        self.number = first_shard
        self._tar: tarfile.TarFile | None = None
        self._size = self._samples = 0
        self._seconds = 0.0

    @property
    def rel_path(self) -> str:
        return f"{self.split}/{self.split}-{self.number:06d}.tar"

    def add(self, key: str, members: list[tuple[str, bytes]], seconds: float) -> dict | None:
        """Add one sample; returns the finished shard's entry when adding it closed the previous shard."""
        size = sum(tar_member_bytes(len(data)) for _, data in members)
        finished = None
        if self._tar is not None and self._size + size + 2 * TAR_BLOCK > self.max_bytes:
            finished = self.close()
        if self._tar is None:
            (self.out / self.split).mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self.out / f"{self.rel_path}.tmp", "w", format=tarfile.PAX_FORMAT)
        for name, data in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._size += size
        self._samples += 1
        self._seconds += seconds
        return finished

    def close(self) -> dict | None:
        if self._tar is None:
            return None
        self._tar.close()
        tmp = self.out / f"{self.rel_path}.tmp"
        sha256, pieces = file_hashes(tmp)
        entry = {"path": self.rel_path, "samples": self._samples, "seconds": round(self._seconds, 4),
                 "bytes": tmp.stat().st_size, "sha256": sha256, "pieces": pieces.entry()}
        os.replace(tmp, self.out / self.rel_path)
        self._tar, self._size, self._samples, self._seconds = None, 0, 0, 0.0
        self.number += 1
        return entry


# ---- journal (resume) ------------------------------------------------------------------------------------

class Journal:
    """OUT/.journal/<split>.jsonl: a header with the settings, then one line per finished shard
    (`shard`, `next_item`, `dropped`), then `complete` when the split is done."""

    def __init__(self, out: Path, split: str, header: dict, on_shard: Callable[[str], None] | None = None):
        """`on_shard(path)`: told each shard journalled from now on (its path relative to `out`)."""
        self.on_shard = on_shard
        self.path = out / ".journal" / f"{split}.jsonl"
        self.out, self.split, self.header = out, split, header
        self.shards: list[dict] = []
        self.drops: list[Drop] = []
        self.next_item = 0
        self.complete = False

    def resume(self) -> tuple[int, int]:
        """Load the journal and keep its records up to the first shard that is missing or fails its sha256;
        later shard files are removed (they will be rewritten). Returns (kept shards, 1 if one failed)."""
        if not self.path.is_file():
            self._write([])
            return 0, 0
        lines = [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not lines or lines[0].get("header") != self.header:
            raise LauncherError(
                f"{self.out} holds {self.split} shards made with other settings or another source "
                f"({self.path}). Rerun with --overwrite to replace them, or choose another --out.")
        kept, bad = [], 0
        for rec in lines[1:]:
            shard = rec.get("shard")
            if shard is not None and Shard(self.out / shard["path"], shard["samples"], bytes=shard["bytes"],
                                           sha256=shard["sha256"]).problem() is not None:
                bad = 1
                break
            kept.append(rec)
        for rec in kept:
            self._apply(rec)
        self._write(kept)
        return len(self.shards), bad

    def _apply(self, rec: dict) -> None:
        if rec.get("shard") is not None:
            self.shards.append(rec["shard"])
        self.drops.extend(Drop(**d) for d in rec["dropped"])
        self.next_item, self.complete = rec["next_item"], bool(rec.get("complete"))

    def _write(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = {s["path"] for s in self.shards}
        folder = self.out / self.split
        for f in sorted(folder.glob("*.tar*")) if folder.is_dir() else []:
            if f"{self.split}/{f.name}" not in kept:
                f.unlink()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"header": self.header}, *records]),
                       encoding="utf-8")
        os.replace(tmp, self.path)

    def record(self, shard: dict | None, next_item: int, drops: list[Drop], complete: bool = False) -> None:
        """Append one record; durable before the next shard starts, so a crash loses at most one shard."""
        rec: dict = {"next_item": next_item, "dropped": [asdict(d) for d in drops]}
        if shard is not None:
            rec["shard"] = shard
        if complete:
            rec["complete"] = True
        self._apply(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if shard is not None and self.on_shard is not None:
            self.on_shard(shard["path"])
