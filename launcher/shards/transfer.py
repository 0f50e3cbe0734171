"""One remote shard's bytes into a local file, checked as they arrive (`fetch`): run in a thread of the fetcher's
process, or in a transfer process of the fetcher's own (`TransferProcess`, what the training loader uses), which
keeps the network library's work (its event loop, the copies, the hashing) off the interpreter lock of the loader
worker that reads and batches the samples.

- Bytes are checked before they are published as readable: a piece at a time against index.json's piece hashes
  (`format.Pieces`), or, for a set written before pieces existed, the whole shard against its sha256 before any of
  it is published. A piece that does not match is fetched again once (bytes corrupted in flight are not the
  shard's); if it still does not match, the shard is bad from there on (`BadShard`): bytes before it were checked,
  none after it is published.
- Bytes are asked for a block at a time (a range request of `Settings.block` bytes). Transient failures (a
  connection reset or dropped mid-shard, a timeout, 5xx, throttling) are retried with exponential backoff from the
  block they broke; nothing above this layer sees them, so no sample is repeated or lost.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from launcher.shards.format import Pieces, Shard
from launcher.shards.location import explain, filesystem
from launcher.shards.reader import BadShard

BLOCK = 16 << 20  # asked for a block at a time (a range request: each costs a round trip); a block's pieces reach the
# reader once the block is in
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError)
ROOT = Path(__file__).resolve().parents[2]  # where `launcher` is imported from: the transfer process imports it too


class Cancelled(Exception):
    pass


class _Mismatch(Exception):
    """Bytes that are not the shard's: fetched again from where the unchecked part starts."""


@dataclass(frozen=True)
class Settings:
    verify: bool = True  # against index.json's pieces (or the whole shard's sha256)
    block: int = BLOCK
    retries: int = 6
    backoff: float = 0.5  # seconds before the first retry, doubled for each next one


def fetch(shard: Shard, part: Path, start: int, settings: Settings, publish: Callable[[int], None],
          stopped: Callable[[], bool]) -> None:
    """The shard's bytes from `start` (0, or a checked byte a transfer reached) into `part` (an existing file),
    `publish(n)` once its first n bytes are checked; returns when all are. BadShard where the rest never will be;
    Cancelled once `stopped()`."""
    _Transfer(shard, part, start, settings, publish, stopped).run()


class _Transfer:
    def __init__(self, shard: Shard, part: Path, start: int, settings: Settings, publish: Callable[[int], None],
                 stopped: Callable[[], bool]):
        self.shard, self.part, self.settings, self._publish, self.stopped = shard, part, settings, publish, stopped
        self.ready = start  # bytes checked and published
        self.written, self.hasher = start, hashlib.sha256()  # bytes in the file; the hash of those not checked yet

    def publish(self, ready: int) -> None:
        self.ready = ready
        self._publish(ready)

    def run(self) -> None:
        """A range request per block; a transient failure is retried from the block it broke, a piece that does not
        match is fetched again once."""
        shard, s = self.shard, self.settings
        fs = filesystem(shard.url)
        pieces = shard.pieces if s.verify else None
        whole = bool(s.verify and shard.sha256 and pieces is None)  # an old set's shard: checked whole, then read
        unchecked = pieces is None and not whole  # published as it is written
        attempt, refetched, size = 0, set(), shard.bytes
        with open(self.part, "r+b", buffering=0) as out:
            while True:
                try:
                    if size is None:  # an index.json without sizes
                        size = fs.size(shard.url)
                    out.seek(self.written)
                    out.truncate()
                    while self.written < size:
                        end = min(self.written + s.block, size)
                        block = fs.cat_file(shard.url, start=self.written, end=end)  # a range request, no copies
                        if self.stopped():
                            raise Cancelled
                        if len(block) != end - self.written:
                            raise ConnectionError(f"asked for bytes {self.written}-{end}, got {len(block)}")
                        self._take(memoryview(block), out, pieces, refetched, unchecked)
                    if whole and self.hasher.hexdigest() != shard.sha256:
                        _mismatch(shard, 0, 1, refetched)
                        raise _Mismatch
                    self.publish(self.written)
                    return
                except _Mismatch:  # again from the start of what was not checked
                    self.written, self.hasher = self.ready, hashlib.sha256()
                except (Cancelled, BadShard):
                    raise
                except PERMANENT as e:
                    raise BadShard(f"shard {explain(shard.url, e)}", shard.samples) from None
                except Exception as e:  # noqa: BLE001 - network libraries raise their own kinds: retried, then named
                    attempt += 1
                    if attempt > s.retries:
                        raise BadShard(f"shard {shard.url} unreadable after {s.retries} retries: "
                                       f"{explain(shard.url, e)}", shard.samples) from None
                    wait = s.backoff * 2 ** (attempt - 1)
                    print(f"warning: {shard.url}: {type(e).__name__} at byte {self.written}; retrying in {wait:.1f} s "
                          f"({attempt}/{s.retries})", file=sys.stderr, flush=True)
                    time.sleep(wait)  # then on from `written`: the blocks before it are in the file and the hash

    def _take(self, view: memoryview, out, pieces: Pieces | None, refetched: set[int], unchecked: bool) -> None:
        """Write and hash `view`, the bytes after `written`: with `pieces`, each one that matches is published; an
        `unchecked` shard's bytes are published as written (a shard checked whole is published at its end)."""
        shard = self.shard
        while view:
            end = (self.written // pieces.size + 1) * pieces.size if pieces else self.written + len(view)
            take, view = view[: end - self.written], view[end - self.written:]
            out.write(take)
            self.hasher.update(take)
            self.written += len(take)
            if pieces and self.written in (end, shard.bytes):
                number = (self.written - 1) // pieces.size
                if self.hasher.hexdigest() != pieces.sha256[number]:
                    _mismatch(shard, number, len(pieces.sha256), refetched)
                    raise _Mismatch
                self.hasher = hashlib.sha256()
                self.publish(self.written)
        if unchecked:
            self.publish(self.written)


def _mismatch(shard: Shard, number: int, count: int, refetched: set[int]) -> None:
    """A piece (or an old set's whole shard) that is not the shard's: fetched again once, then a bad shard."""
    if number in refetched:
        where = f"piece {number + 1} of {count}, " if count > 1 else ""
        raise BadShard(f"shard {shard.url} does not match its sha256 in index.json ({where}fetched twice)",
                       shard.samples)
    refetched.add(number)


def outcome(shard: Shard, run: Callable[[], None]) -> BadShard | None:
    """None once `run` (a `fetch`) has brought the whole shard, else the BadShard its reader gets."""
    try:
        run()
    except Cancelled:
        return BadShard(f"shard {shard.url}: reading stopped", 0)
    except BadShard as e:
        return e
    except Exception as e:  # noqa: BLE001 - never leave a reader waiting
        return BadShard(f"shard {shard.url}: {type(e).__name__}: {e}", shard.samples)
    return None


# ---- a transfer process ----------------------------------------------------------------------------------------
# The fetcher sends ("start", key, shard, part, start, settings) and ("stop", key) on the process's stdin; the process
# answers on its stdout ("ready", key, bytes), ("done", key) or ("failed", key, message, samples skipped). Both are
# pickles of plain values between two processes of one program.


class TransferProcess:
    """A process running up to `parallel` transfers at once for one fetcher; `report` gets each answer, from a
    listener thread, and ("ended", exit code, itself) once the process is gone (the fetcher fails what it ran)."""

    def __init__(self, parallel: int, report: Callable[[tuple], None]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        # a session of its own: a terminal's Ctrl-C reaches the training, which stops it by closing its stdin
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.shards.transfer", str(parallel)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._lock = threading.Lock()
        threading.Thread(target=self._listen, args=(report,), name="shard-transfer", daemon=True).start()

    def start(self, key: int, shard: Shard, part: Path, start: int, settings: Settings) -> None:
        self._send(("start", key, shard, str(part), start, settings))

    def stop(self, key: int) -> None:
        self._send(("stop", key))

    def close(self) -> None:
        with self._lock:
            self.proc.stdin.close()  # the process leaves once its stdin ends
        self.proc.wait()

    def _send(self, message: tuple) -> None:
        with self._lock:
            try:
                pickle.dump(message, self.proc.stdin)
                self.proc.stdin.flush()
            except (OSError, ValueError):  # gone: the listener reports its end
                pass

    def _listen(self, report: Callable[[tuple], None]) -> None:
        while True:
            try:
                message = pickle.load(self.proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            report(message)
        report(("ended", self.proc.wait(), self))


def serve(parallel: int) -> None:
    """The transfer process: commands from stdin until it ends (its fetcher is gone, and so is this process)."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the answers
    lock, stopped = threading.Lock(), set()
    pool = ThreadPoolExecutor(parallel, thread_name_prefix="shard-fetch")

    def answer(message: tuple) -> None:
        with lock:
            try:
                pickle.dump(message, answers)
                answers.flush()
            except OSError:  # the fetcher is gone (its worker ended): so is this process, without retries or words
                os._exit(0)

    def run(key: int, shard: Shard, part: str, start: int, settings: Settings) -> None:
        error = outcome(shard, lambda: fetch(shard, Path(part), start, settings, lambda n: answer(("ready", key, n)),
                                             lambda: key in stopped))
        answer(("done", key) if error is None else ("failed", key, str(error), error.skipped))

    while True:
        try:
            command, key, *rest = pickle.load(sys.stdin.buffer)
        except EOFError:
            break
        if command == "start":
            pool.submit(run, key, *rest)
        else:
            stopped.add(key)
    os._exit(0)  # transfers under way are abandoned: their fetcher is gone


if __name__ == "__main__":
    serve(int(sys.argv[1]))
