"""Bringing a remote set's shards to this node (`ShardFetcher`): the loader's guarantees kept over a network.

- A shard is streamed: its bytes arrive in a local file (`transfer.fetch`: checked by piece, retried, run in a
  transfer process of the fetcher's own for the training loader, else in a thread), and the reader reads them as they
  arrive and are checked (`open`), through the same tar reader as a folder's shard, so a run from a URL sees the
  same samples in the same order as from the folder: same losses, bitwise, and the same exact resume. Where the rest
  of a shard never comes or is not the shard's, the reader gets a `BadShard` (named and counted as a local bad shard
  is, or the run stops with `data.on_bad_data: stop`): the samples before it were checked, none after it is used.
- The next shards of the worker's part of the epoch are fetched in the background (`ahead`), `prefetch` at a time
  beside the one being read, so reading rarely waits on the network.
- With a cache folder and a size bound (`data.remote_cache` / `data.remote_cache_gb`), copies are kept for later
  epochs and ranks on the node, the least recently used evicted past the bound; without one, each download has a
  file of its own, deleted once read.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from launcher.shards import transfer
from launcher.shards.format import Shard
from launcher.shards.location import explain, filesystem
from launcher.shards.reader import BadShard

READ_BUFFER = 1 << 20  # a shard still arriving is read through a buffer this big


class _Download:
    """One shard's bytes arriving in a local file of its own (`part`; with a cache, renamed to the content-addressed
    `target` when whole): `ready` bytes of it are checked and may be read; `error` is why the rest never will be."""

    def __init__(self, shard: Shard, folder: Path, target: Path | None):
        self.shard, self.target = shard, target
        self.part = folder / f"{shard.name}.{os.getpid()}.{threading.get_ident()}.{id(self)}.part"
        self.part.touch()  # readers open it at once, before the transfer starts
        self.size = shard.bytes
        self.ready = 0  # bytes checked: a reader may read them
        self.finished = self.cancelled = self.released = self.restarted = False
        self.error: BadShard | None = None
        self.cond = threading.Condition()
        self.stop: Callable[[], None] = lambda: None  # tells the transfer process, where one runs it

    def publish(self, ready: int) -> None:
        with self.cond:
            self.ready = ready
            self.cond.notify_all()

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
        """The reader is done: stop downloading (the part file goes when the transfer stops)."""
        with self.cond:
            self.cancelled = True
        self.stop()


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
        """The checked bytes of those asked for, at least one (waiting for it); 0 at the end. Short reads are the
        buffer's in front (`_Arriving`), which reads on until it has what its reader asked for."""
        size = self._size()
        if self.pos >= size:
            return 0
        self.download.wait(self.pos + 1)
        end = min(self.pos + len(buffer), size, self.download.ready)
        self._file.seek(self.pos)
        view, got = memoryview(buffer)[: end - self.pos], 0
        while got < len(view) and (n := self._file.readinto(view[got:])):
            got += n
        self.pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _Arriving(io.BufferedReader):
    """A shard still arriving, read through a buffer: tarfile's many small reads are served in C, not each by a
    Python read that takes the download's lock."""

    def __init__(self, download: _Download):
        super().__init__(_ArrivingFile(download), READ_BUFFER)

    @property
    def download(self) -> _Download:
        return self.raw.download


class ShardFetcher:
    """One process's remote shards (a loader worker's, evaluation's): opened as they arrive, fetched ahead, cached.
    With `process`, the transfers run in a process of the fetcher's own (`transfer.TransferProcess`), which keeps
    their work off this process's interpreter lock; it is started on the first remote shard and, if it dies, started
    again for what it was fetching (once per shard, from the last checked byte)."""

    def __init__(self, cache: Path | None = None, cache_bytes: int = 0, *, prefetch: int = 2, retries: int = 6,
                 backoff: float = 0.5, verify: bool = True, block: int = transfer.BLOCK, process: bool = False):
        self.cache = Path(cache) if cache else None
        self.cache_bytes, self.prefetch = cache_bytes, max(prefetch, 0)
        self.settings = transfer.Settings(verify, block, retries, backoff)
        self.process = process  # transfers in a process of their own, else in threads of this one
        self._scratch: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._process: transfer.TransferProcess | None = None
        self._running: dict[int, tuple[_Download, transfer.TransferProcess]] = {}  # by key, in a transfer process
        self._keys = itertools.count()
        self._closed = False
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
        return _Arriving(download)

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
            if isinstance(file, _Arriving):
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
        self._closed = True
        if self._process is not None:  # it leaves its transfers as they are: their files go here
            self._process.close()
            for download, _ in self._running.values():
                download.part.unlink(missing_ok=True)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- the work ----------------------------------------------------------------------------------------------

    def _start(self, shard: Shard) -> _Download:
        download = _Download(shard, self._folder(), self._target(shard))
        with self._lock:
            self._latest[shard.url] = download
            if not self.process:
                if self._pool is None:  # the shard being read, and `prefetch` more
                    self._pool = ThreadPoolExecutor(self.prefetch + 1, thread_name_prefix="shard-fetch")
                self._pool.submit(self._run, download)
                return download
        self._launch(download)
        return download

    def _launch(self, download: _Download) -> None:
        """The download in the transfer process (a new one where the last has ended), from the byte reached."""
        with self._lock:
            if self._process is None:
                self._process = transfer.TransferProcess(self.prefetch + 1, self._answer)
            key, process = next(self._keys), self._process
            self._running[key] = (download, process)  # before it starts: if the process ends, it is known to be lost
        download.stop = lambda: process.stop(key)
        process.start(key, download.shard, download.part, download.ready, self.settings)

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
        self._done(download, transfer.outcome(download.shard, lambda: transfer.fetch(
            download.shard, download.part, 0, self.settings, download.publish, lambda: download.cancelled)))

    def _answer(self, message: tuple) -> None:
        """The transfer process's answers (its listener thread)."""
        kind, key, *rest = message
        if kind == "ended":  # killed (out of memory, by hand): what it was fetching starts again in a new one, once
            with self._lock:
                lost = [d for d, p in self._running.values() if p is rest[0]]
                self._running = {k: v for k, v in self._running.items() if v[1] is not rest[0]}
                if self._process is rest[0]:
                    self._process = None
            for download in lost:
                if download.restarted or download.cancelled or self._closed:
                    self._done(download, BadShard(f"shard {download.shard.url}: its transfer process ended twice "
                                                  f"(exit code {key}) at byte {download.ready}",
                                                  download.shard.samples))
                    continue
                print(f"warning: {download.shard.url}: the transfer process ended (exit code {key}); fetching again "
                      f"from byte {download.ready}", file=sys.stderr, flush=True)
                download.restarted = True
                self._launch(download)
            return
        with self._lock:
            download = self._running[key][0] if kind == "ready" else self._running.pop(key)[0]
        if kind == "ready":
            download.publish(rest[0])
        else:
            self._done(download, None if kind == "done" else BadShard(*rest))

    def _done(self, download: _Download, error: BadShard | None) -> None:
        download.finish(error, then=None if error else lambda: self._evict(keep=download.target))

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
