"""Bringing a remote set's shards to this node (`ShardFetcher`): the loader's guarantees kept over a network.

- Every shard is downloaded whole into a local file before any of its samples is read, its sha256 computed on the
  way and compared with index.json's: a shard is used entirely or, if its bytes stay wrong or unreadable, not at all
  (`BadShard`, named and counted as a local bad shard is, or the run stops with `data.on_bad_data: stop`). Samples
  are then read from the local copy exactly as from a folder, so a run from a URL sees the same samples in the same
  order as from the folder: same losses, bitwise, and the same exact resume.
- Transient failures (a connection reset or dropped mid-shard, a timeout, 5xx, throttling) are retried with
  exponential backoff, continuing at the byte reached (a range request); nothing above this layer sees them, so no
  sample is repeated or lost.
- The next shards of the worker's part of the epoch are fetched in the background (`ahead`), `prefetch` at a time,
  so reading rarely waits on the network.
- With a cache folder and a size bound (`data.remote_cache` / `data.remote_cache_gb`), copies are kept for later
  epochs and ranks on the node, the least recently used evicted past the bound; without one, each copy is deleted
  once read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from launcher.shards.format import Shard
from launcher.shards.location import explain, filesystem
from launcher.shards.reader import BadShard

CHUNK = 1 << 20  # written and hashed a chunk at a time
BLOCK = 16 << 20  # asked for a block at a time: a request per 16 MiB, not per chunk, where each costs a round trip
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError)


class ShardFetcher:
    def __init__(self, cache: Path | None = None, cache_bytes: int = 0, *, prefetch: int = 2, retries: int = 6,
                 backoff: float = 0.5, verify: bool = True):
        self.cache = Path(cache) if cache else None
        self.cache_bytes, self.prefetch, self.retries, self.backoff = cache_bytes, max(prefetch, 0), retries, backoff
        self.verify = verify
        self._scratch: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}
        self._queue: list[Shard] = []
        self._lock = threading.Lock()

    # ---- where copies go ---------------------------------------------------------------------------------------

    def _target(self, shard: Shard) -> Path:
        """Content-addressed (by the index's sha256, else the URL): a copy of that name is that shard, whichever set
        or epoch asks for it."""
        if self.cache is None and self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="launcher-shards-"))
        key = shard.sha256 or hashlib.sha256(shard.url.encode()).hexdigest()
        return (self.cache or self._scratch) / f"{key[:40]}.tar"

    # ---- the public part ---------------------------------------------------------------------------------------

    def ahead(self, shards: list[Shard]) -> None:
        """The remote shards this reader will want, in order: the first `prefetch` start downloading now."""
        with self._lock:
            self._queue = [s for s in shards if s.remote]
        self._schedule()

    def local(self, shard: Shard) -> Path:
        """A local file with the shard's bytes (checked against index.json), fetched now unless prefetched."""
        if not shard.remote:
            return shard.path
        with self._lock:
            if shard in self._queue:
                self._queue = self._queue[self._queue.index(shard) + 1:]
            job = self._jobs.get(shard.url)
        path = job.result() if job is not None else self._fetch(shard)
        with self._lock:
            self._jobs.pop(shard.url, None)
        self._schedule()
        return path

    def release(self, shard: Shard, path: Path) -> None:
        """Done with a copy: without a cache it is deleted."""
        if shard.remote and self.cache is None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- the work ----------------------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self.prefetch:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="shard-prefetch")
            for shard in self._queue[: self.prefetch]:
                if shard.url not in self._jobs:
                    self._jobs[shard.url] = self._pool.submit(self._fetch, shard)

    def _fetch(self, shard: Shard) -> Path:
        target = self._target(shard)
        if target.is_file() and target.stat().st_size == shard.bytes:
            os.utime(target)  # recently used: evicted last
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            digest = self._download(shard, part)
            if self.verify and shard.sha256 and digest != shard.sha256:
                digest = self._download(shard, part)  # once more: bytes corrupted in flight are not the shard's
                if digest != shard.sha256:
                    raise BadShard(f"shard {shard.url} does not match its sha256 in index.json (downloaded twice)",
                                   shard.samples)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        self._evict(keep=target)
        return target

    def _download(self, shard: Shard, part: Path) -> str:
        """The shard's bytes into `part`, continuing after transient failures at the byte reached; its sha256."""
        fs = filesystem(shard.url)
        digest, done, attempt = hashlib.sha256(), 0, 0
        with open(part, "wb") as out:
            while True:
                try:
                    with fs.open(shard.url, "rb", block_size=BLOCK) as f:
                        if done:
                            f.seek(done)
                        while block := f.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            done += len(block)
                    if shard.bytes is not None and done < shard.bytes:
                        raise ConnectionError(f"the transfer ended at byte {done} of {shard.bytes}")
                    return digest.hexdigest()
                except PERMANENT as e:
                    raise BadShard(f"shard {explain(shard.url, e)}", shard.samples) from None
                except Exception as e:  # noqa: BLE001 - network libraries raise their own kinds: retried, then named
                    attempt += 1
                    if attempt > self.retries:
                        raise BadShard(f"shard {shard.url} unreadable after {self.retries} retries: "
                                       f"{explain(shard.url, e)}", shard.samples) from None
                    wait = self.backoff * 2 ** (attempt - 1)
                    print(f"warning: {shard.url}: {type(e).__name__} at byte {done}; retrying in {wait:.1f} s "
                          f"({attempt}/{self.retries})", file=sys.stderr, flush=True)
                    time.sleep(wait)

    def _evict(self, keep: Path) -> None:
        """Least recently used copies out, past the cache's size bound (the one just fetched stays)."""
        if self.cache is None or not self.cache_bytes:
            return
        files = sorted((p for p in self.cache.rglob("*.tar") if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.cache_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


def problem(shard: Shard, hash_it: bool = True) -> str | None:
    """`Shard.problem` for a shard anywhere: a remote one's size from the store (`hash_it`: fetched and hashed)."""
    if not shard.remote:
        return shard.problem(hash_it)
    try:
        size = filesystem(shard.url).info(shard.url).get("size")
    except FileNotFoundError:
        return "is missing"
    except Exception as e:  # noqa: BLE001 - any library's failure, in one line
        return f"cannot be reached: {explain(shard.url, e)}"
    if shard.bytes is not None and size is not None and size != shard.bytes:
        return f"has {size} bytes, index.json says {shard.bytes}"
    if hash_it and shard.sha256:
        fetcher = ShardFetcher(prefetch=0)
        try:
            fetcher.release(shard, fetcher.local(shard))
        except BadShard as e:
            return str(e).removeprefix(f"shard {shard.url} ")
        finally:
            fetcher.close()
    return None
