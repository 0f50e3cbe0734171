"""Bringing a remote set's shards to this node (`ShardFetcher`): the loader's guarantees kept over a network.

- A shard is streamed: its bytes arrive in a local file, in a background thread, and the reader reads them as they
  arrive (`open`), through the same tar reader as a folder's shard, so a run from a URL sees the same samples in the
  same order as from the folder: same losses, bitwise, and the same exact resume.
- Bytes are checked before the reader sees them: a piece at a time against index.json's piece hashes
  (`format.Pieces`), or, for a set written before pieces existed, the whole shard against its sha256 before any of
  it is read. A piece that does not match is fetched again once (bytes corrupted in flight are not the shard's);
  if it still does not match, the shard is bad from there on (`BadShard`, named and counted as a local bad shard
  is, or the run stops with `data.on_bad_data: stop`): samples before it were checked, none after it is used.
- Transient failures (a connection reset or dropped mid-shard, a timeout, 5xx, throttling) are retried with
  exponential backoff, continuing at the byte reached (a range request); nothing above this layer sees them, so no
  sample is repeated or lost.
- The next shards of the worker's part of the epoch are fetched in the background (`ahead`), `prefetch` at a time
  beside the one being read, so reading rarely waits on the network.
- With a cache folder and a size bound (`data.remote_cache` / `data.remote_cache_gb`), copies are kept for later
  epochs and ranks on the node, the least recently used evicted past the bound; without one, each download has a
  file of its own, deleted once read.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from launcher.shards.format import Pieces, Shard
from launcher.shards.location import explain, filesystem
from launcher.shards.reader import BadShard

CHUNK = 1 << 20  # written, hashed and handed on a chunk at a time
BLOCK = 16 << 20  # asked for a block at a time: a request per 16 MiB, not per chunk, where each costs a round trip;
# a block's bytes reach the reader once the block is in (the filesystems' range reads return whole blocks)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError)


class _Cancelled(Exception):
    pass


class _Mismatch(Exception):
    """Bytes that are not the shard's: fetched again from where the unchecked part starts."""


class _Download:
    """One shard's bytes arriving in a local file of its own (`part`; with a cache, renamed to the content-addressed
    `target` when whole): `ready` bytes of it are checked and may be read; `error` is why the rest never will be."""

    def __init__(self, shard: Shard, folder: Path, target: Path | None):
        self.shard, self.target = shard, target
        self.part = folder / f"{shard.name}.{os.getpid()}.{threading.get_ident()}.{id(self)}.part"
        self.part.touch()  # readers open it at once, before the download thread starts
        self.size = shard.bytes
        self.ready = 0  # bytes checked: a reader may read them
        self.written, self.hasher = 0, hashlib.sha256()  # the download thread's: bytes in the file, the unchecked hash
        self.finished = self.cancelled = self.released = False
        self.error: BadShard | None = None
        self.cond = threading.Condition()

    def publish(self, ready: int) -> None:
        with self.cond:
            self.ready = ready
            self.cond.notify_all()
            if self.cancelled:
                raise _Cancelled

    def finish(self, error: BadShard | None = None, then: Callable[[], None] | None = None) -> None:
        """Whole and checked (renamed into place, unless cancelled meanwhile, and `then` called before a reader
        hears of it), or failed with `error`: the file stays for its reader, whose checked part is still good
        (whenever the reader opens it, it reads the same samples), and goes when the reader releases it."""
        with self.cond:
            if self.cancelled or (error is not None and self.released):
                self.part.unlink(missing_ok=True)
            elif error is None:
                if self.target is not None:
                    os.replace(self.part, self.target)
                self.size = self.ready
                if then is not None:
                    then()
            self.finished, self.error = True, error
            self.cond.notify_all()

    def wait(self, upto: int) -> None:
        """Until `upto` bytes may be read; BadShard if they never will."""
        with self.cond:
            while self.ready < upto and not self.finished:
                self.cond.wait()
            if self.ready < upto and self.error is not None:
                raise BadShard(str(self.error), self.error.skipped)

    @property
    def path(self) -> Path:
        """Where the bytes are: the part file, or once whole and kept, the cache's copy."""
        return self.target if self.target is not None and self.finished and self.error is None else self.part

    def cancel(self) -> None:
        """The reader is done: stop downloading (the thread deletes the part file)."""
        with self.cond:
            self.cancelled = True


class _ArrivingFile(io.RawIOBase):
    """A seekable read-only view of a shard still arriving: a read waits until its bytes are there and checked."""

    def __init__(self, download: _Download):
        super().__init__()
        self.download, self.pos = download, 0
        try:  # the part file stays until its reader releases it, unless a cache took it whole meanwhile
            self._file = open(download.part, "rb")  # noqa: SIM115 - closed with this object
        except FileNotFoundError:
            self._file = open(download.target, "rb")  # noqa: SIM115
        self.name = str(download.target or download.part)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _size(self) -> int:
        if self.download.size is None:  # index.json without sizes: known once whole
            self.download.wait(sys.maxsize)
        return self.download.size if self.download.size is not None else self.download.ready

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos}.get(whence)
        self.pos = max(0, offset + (self._size() if base is None else base))
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self._size())
        if end <= self.pos:
            return 0
        self.download.wait(end)
        self._file.seek(self.pos)
        view, got = memoryview(buffer)[: end - self.pos], 0
        while got < len(view) and (n := self._file.readinto(view[got:])):  # a full read: tarfile takes short as end
            got += n
        self.pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class ShardFetcher:
    def __init__(self, cache: Path | None = None, cache_bytes: int = 0, *, prefetch: int = 2, retries: int = 6,
                 backoff: float = 0.5, verify: bool = True, block: int = BLOCK):
        self.cache = Path(cache) if cache else None
        self.block, self.chunk = block, min(CHUNK, block)  # bytes a request asks for; bytes handed on at a time
        self.cache_bytes, self.prefetch, self.retries, self.backoff = cache_bytes, max(prefetch, 0), retries, backoff
        self.verify = verify
        self._scratch: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[str, _Download] = {}  # fetched ahead, not opened yet
        self._latest: dict[str, _Download] = {}  # each URL's last download: one under way is not started again
        self._queues: dict[int, list[Shard]] = {}
        self._lock = threading.Lock()

    # ---- where copies go ---------------------------------------------------------------------------------------

    def _folder(self) -> Path:
        """The cache, or (without one) a scratch folder where each download has a file of its own, deleted once
        read: two downloads of one shard (the end of an epoch and the start of the next) never share a file."""
        if self.cache is None and self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="launcher-shards-"))
        folder = self.cache or self._scratch
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _target(self, shard: Shard) -> Path | None:
        """A cached copy's name, content-addressed (by the index's sha256, else the URL): a copy of that name is that
        shard, whichever set or epoch asks for it. None without a cache."""
        if self.cache is None:
            return None
        key = shard.sha256 or hashlib.sha256(shard.url.encode()).hexdigest()
        return self._folder() / f"{key[:40]}.tar"

    def _cached(self, shard: Shard) -> Path | None:
        target = self._target(shard)
        if target is not None and target.is_file() and target.stat().st_size == shard.bytes:
            os.utime(target)  # recently used: evicted last
            return target
        return None

    # ---- the public part ---------------------------------------------------------------------------------------

    def ahead(self, shards: list[Shard], lane: int = 0) -> None:
        """The remote shards this reader will want from one of the sets it reads side by side (`lane`), in order: the
        first `prefetch` of each lane start downloading now."""
        with self._lock:
            self._queues[lane] = [s for s in shards if s.remote]
        self._schedule()

    def open(self, shard: Shard) -> BinaryIO:
        """The shard's bytes to read, in order or not: a local file, a cached copy, or a copy still arriving (a read
        waits for its bytes, checked; BadShard where they never come or are not the shard's). `release` it."""
        if not shard.remote:
            try:
                return open(shard.path, "rb")  # noqa: SIM115 - the caller releases it
            except OSError as e:
                raise BadShard(f"shard {shard.path} cannot be opened: {type(e).__name__}: {e.strerror}",
                               shard.samples) from None
        with self._lock:
            for lane, queue in self._queues.items():
                if shard in queue:
                    self._queues[lane] = queue[queue.index(shard) + 1:]
                    break
            download = self._jobs.pop(shard.url, None)
        if download is None:
            if (cached := self._cached(shard)) is not None:
                self._schedule()
                return open(cached, "rb")  # noqa: SIM115
            download = self._start(shard)
        self._schedule()
        return _ArrivingFile(download)

    def release(self, shard: Shard, file: BinaryIO) -> None:
        """Done with a shard: closed; without a cache its download is stopped and its copy deleted (a cache keeps
        it, and lets the download finish; a failed one's file goes)."""
        file.close()
        download = getattr(file, "download", None)
        if download is None:
            return
        with download.cond:
            download.released = True
            failed = download.error is not None
        if self.cache is None or failed:
            download.cancel()
            download.part.unlink(missing_ok=True)

    def local(self, shard: Shard) -> Path:
        """The whole shard as a local file (checked against index.json): for readers that keep paths to its bytes."""
        if not shard.remote:
            return shard.path
        file = self.open(shard)
        try:
            if isinstance(file, _ArrivingFile):
                file.download.wait(sys.maxsize)
                return file.download.path
            return Path(file.name)
        finally:
            file.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for download in self._jobs.values():
            download.cancel()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- the work ----------------------------------------------------------------------------------------------

    def _start(self, shard: Shard) -> _Download:
        with self._lock:
            if self._pool is None:  # the shard being read, and `prefetch` more
                self._pool = ThreadPoolExecutor(self.prefetch + 1, thread_name_prefix="shard-fetch")
        download = _Download(shard, self._folder(), self._target(shard))
        with self._lock:
            self._latest[shard.url] = download
        self._pool.submit(self._run, download)
        return download

    def _schedule(self) -> None:
        if not self.prefetch:
            return
        with self._lock:
            wanted = [s for queue in self._queues.values() for s in queue[: self.prefetch]
                      if s.url not in self._jobs and (s.url not in self._latest or self._latest[s.url].finished)]
        for shard in dict.fromkeys(wanted):
            if self._cached(shard) is None:
                download = self._start(shard)
                with self._lock:
                    self._jobs[shard.url] = download

    def _run(self, download: _Download) -> None:
        try:
            self._download(download)
        except _Cancelled:
            download.finish(BadShard(f"shard {download.shard.url}: reading stopped", 0))
            return
        except BadShard as e:
            download.finish(e)
            return
        except BaseException as e:  # noqa: BLE001 - never leave a reader waiting
            download.finish(BadShard(f"shard {download.shard.url}: {type(e).__name__}: {e}", download.shard.samples))
            raise
        download.finish(then=lambda: self._evict(keep=download.target))  # nothing to evict without a cache

    def _download(self, d: _Download) -> None:
        """The shard's bytes into the download's file, `ready` moved on as they are checked; transient failures are
        retried at the byte reached, a piece that does not match is fetched again once."""
        shard = d.shard
        fs = filesystem(shard.url)
        pieces = shard.pieces if self.verify else None
        whole = bool(self.verify and shard.sha256 and pieces is None)  # an old set's shard: checked whole, then read
        unchecked = pieces is None and not whole  # published as it is written
        attempt, refetched = 0, set()
        with open(d.part, "r+b", buffering=0) as out:
            while True:
                try:
                    with fs.open(shard.url, "rb", block_size=self.block) as f:
                        if d.written:
                            f.seek(d.written)
                        out.seek(d.written)
                        out.truncate()
                        while block := f.read(self.chunk):
                            if d.cancelled:
                                raise _Cancelled
                            self._take(d, memoryview(block), out, pieces, refetched, unchecked)
                    if shard.bytes is not None and d.written < shard.bytes:
                        raise ConnectionError(f"the transfer ended at byte {d.written} of {shard.bytes}")
                    if whole and d.hasher.hexdigest() != shard.sha256:
                        self._mismatch(shard, 0, 1, refetched)
                        raise _Mismatch
                    d.publish(d.written)
                    return
                except _Mismatch:  # again from the start of what was not checked
                    d.written, d.hasher = d.ready, hashlib.sha256()
                except (_Cancelled, BadShard):
                    raise
                except PERMANENT as e:
                    raise BadShard(f"shard {explain(shard.url, e)}", shard.samples) from None
                except Exception as e:  # noqa: BLE001 - network libraries raise their own kinds: retried, then named
                    attempt += 1
                    if attempt > self.retries:
                        raise BadShard(f"shard {shard.url} unreadable after {self.retries} retries: "
                                       f"{explain(shard.url, e)}", shard.samples) from None
                    wait = self.backoff * 2 ** (attempt - 1)
                    print(f"warning: {shard.url}: {type(e).__name__} at byte {d.written}; retrying in {wait:.1f} s "
                          f"({attempt}/{self.retries})", file=sys.stderr, flush=True)
                    time.sleep(wait)  # then on from `written`: the bytes before it are in the file and the hash

    def _take(self, d: _Download, view: memoryview, out, pieces: Pieces | None, refetched: set[int],
              unchecked: bool) -> None:
        """Write and hash `view`, the bytes after `d.written`: with `pieces`, each one that matches is published; an
        `unchecked` shard's bytes are published as written (a shard checked whole is published at its end)."""
        shard = d.shard
        if shard.bytes is not None and d.written + len(view) > shard.bytes:
            raise BadShard(f"shard {shard.url} has more bytes than index.json's {shard.bytes}", shard.samples)
        while view:
            end = (d.written // pieces.size + 1) * pieces.size if pieces else d.written + len(view)
            take, view = view[: end - d.written], view[end - d.written:]
            out.write(take)
            d.hasher.update(take)
            d.written += len(take)
            if pieces and d.written in (end, shard.bytes):
                number = (d.written - 1) // pieces.size
                if d.hasher.hexdigest() != pieces.sha256[number]:
                    self._mismatch(shard, number, len(pieces.sha256), refetched)
                    raise _Mismatch
                d.hasher = hashlib.sha256()
                d.publish(d.written)
        if unchecked:
            d.publish(d.written)

    @staticmethod
    def _mismatch(shard: Shard, number: int, count: int, refetched: set[int]) -> None:
        """A piece (or an old set's whole shard) that is not the shard's: fetched again once, then a bad shard."""
        if number in refetched:
            where = f"piece {number + 1} of {count}, " if count > 1 else ""
            raise BadShard(f"shard {shard.url} does not match its sha256 in index.json ({where}fetched twice)",
                           shard.samples)
        refetched.add(number)

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
            fetcher.local(shard)
        except BadShard as e:
            return str(e).removeprefix(f"shard {shard.url} ")
        finally:
            fetcher.close()
    return None
