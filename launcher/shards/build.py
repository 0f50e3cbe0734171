"""`launcher shard`: a corpus -> WebDataset tar shards of unpadded float16 Whisper log-mel + transcript JSON.

Order and determinism: splits are written test, validation, train (so a clip that is also in test is
dropped from train, not the other way round), clips in the source's order, features computed by a pool
of processes whose results are taken back in order. Shards are cut by size, tar headers carry no time
or owner, so the same input and settings give byte-identical shards.

Resume: each finished shard is renamed from .tmp into place and then recorded, with its sha256 and the
drops seen so far, in a journal (OUT/.journal/<split>.jsonl). A rerun keeps the journalled shards whose
sha256 still matches, skips their clips without decoding them, and writes the rest, identical to what an
uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from rich.progress import Progress

from launcher import audio, features
from launcher.errors import LauncherError
from launcher.shards.format import DROPPED_FILE, FORMAT, INDEX_FILE, MEL, META, features_entry, sample_key, write_index
from launcher.shards.writer import Drop, Journal, ShardWriter
from launcher.sources.base import SPLITS, Clip, Source
from launcher.text import clean_transcript

WRITE_ORDER = ("test", "validation", "train")
CHUNK = 8  # clips per task sent to a worker: amortises inter-process overhead, keeps order cheap
INFLIGHT_PER_WORKER = 4  # chunks queued per worker: bounded memory however large the corpus


@dataclass(frozen=True)
class ShardSettings:
    """What determines the shards' bytes: a rerun with other settings must not mix with these."""

    n_mels: int
    shard_bytes: int
    language: str


# ---- worker side -----------------------------------------------------------------------------------------

def _init_worker(parent_alive=None) -> None:
    import threading

    import torch

    torch.set_num_threads(1)  # one process per core; intra-op threads would only contend
    if parent_alive is not None:
        # `parent_alive` is the read end of a pipe whose only write end is in the main process: it reads EOF
        # when that process is gone, even SIGKILLed. Nothing else would stop this worker then: it would wait
        # forever on the call queue (every worker holds that pipe's write end too), its parent is the forkserver
        # (which waits for its own alive pipe, held open by the workers) and the resource tracker waits for the
        # workers. Exiting here lets all of them go: see _Pool.
        def watch() -> None:
            try:
                parent_alive.recv_bytes()
            except (EOFError, OSError):
                pass
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def featurize(task: tuple[int, str, str, str, bytes, int, str, str | None]) -> tuple:
    """(item, id, origin, text, encoded audio, n_mels, lang, speaker) -> ("ok", item, id, npy bytes, json bytes,
    seconds) or ("drop", item, id, reason, detail)."""
    item, cid, origin, text, data, n_mels, lang, speaker = task
    try:
        samples = audio.decode_audio(data)
    except audio.AudioError as e:
        return ("drop", item, cid, e.reason, f"{origin}: {e.detail}")
    seconds = len(samples) / features.SAMPLE_RATE
    if len(samples) > features.N_SAMPLES:
        return ("drop", item, cid, "too_long",
                f"{origin}: {seconds:.2f} s, Whisper's window is {features.CHUNK_LENGTH} s")
    mel = features.log_mel_spectrogram(samples, n_mels).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    meta = {"id": cid, "text": text, "lang": lang, "seconds": round(seconds, 4),
            **({"speaker": speaker} if speaker else {})}
    return ("ok", item, cid, buf.getvalue(), json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), seconds)


def featurize_chunk(tasks: list[tuple]) -> list[tuple]:
    return [featurize(t) for t in tasks]


# ---- tar writing -------------------------------------------------------------------------------------------

# ---- the run -----------------------------------------------------------------------------------------------

class _Dedup:
    """Ids and audio contents seen so far in this run, across splits."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.contents: dict[str, tuple[str, str]] = {}

    def check(self, split: str, clip: Clip) -> tuple[str, str] | None:
        if clip.id in self.ids:
            return "duplicate", f"{clip.origin}: id {clip.id!r} already taken in {self.ids[clip.id]}"
        digest = hashlib.sha1(clip.audio).hexdigest()
        if digest in self.contents:
            other_id, other_split = self.contents[digest]
            return "duplicate", f"{clip.origin}: same audio bytes as {other_id!r} in {other_split}"
        self.ids[clip.id] = split
        self.contents[digest] = (clip.id, split)
        return None


def _precheck(split: str, item: int, clip: Clip, dedup: _Dedup) -> tuple[Drop | None, str]:
    """Drops decided without decoding: the source's own problems, empty text, duplicates, stated length."""
    text = clean_transcript(clip.text or "")
    why = clip.problem
    if why is None and not text:
        why = ("empty_text", f"{clip.origin}: the transcript is empty after clean-up (source: {clip.text!r})")
    if why is None:
        why = dedup.check(split, clip)
    if why is None and clip.duration is not None and clip.duration > features.CHUNK_LENGTH:
        why = ("too_long", f"{clip.origin}: {clip.duration:.2f} s stated, Whisper's window is "
                           f"{features.CHUNK_LENGTH} s")
    return (Drop(split, item, clip.id, *why) if why else None), text


class _Pool:
    """Ordered, bounded map over worker processes (or inline when workers == 0)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._ex = None
        if workers > 0:
            # Workers fork from a server that imported this module (and torch) once: N workers do not pay
            # N imports, and nothing is forked from the main process and its progress-bar thread.
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            # If this process dies without shutting the pool down (SIGKILL, OOM killer), the workers see
            # `_alive_r` at EOF and exit; then the forkserver and the resource tracker, which only wait for the
            # last holder of their pipes, exit too. PR_SET_PDEATHSIG would not do: the workers' parent is the
            # forkserver, which outlives this process for as long as any worker lives.
            self._alive_r, self._alive_w = ctx.Pipe(duplex=False)  # nothing is ever sent
            self._ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(self._alive_r,))

    def map(self, chunks: Iterator[list[tuple]]) -> Iterator[tuple]:
        if self._ex is None:
            for chunk in chunks:
                yield from featurize_chunk(chunk)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self._ex.submit(featurize_chunk, chunk))
            if len(pending) >= self.workers * INFLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def shutdown(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)  # waits for the workers: only then is the pipe closed
            self._alive_w.close()
            self._alive_r.close()
            self._ex = None


def _chunks(tasks: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    chunk = []
    for t in tasks:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def shard_corpus(source: Source, out: Path, settings: ShardSettings, *, workers: int, splits: list[str] | None = None,
                 overwrite: bool = False, progress: Progress | None = None, label: str = "",
                 on_shard: Callable[[str], None] | None = None) -> dict:
    """Write the splits of `source` to `out` (resuming a run that stopped); returns the index written to
    out/index.json. `label` goes before the split's name on the progress display (the language, when one command
    shards several); `on_shard(path)` is told each shard finished (an upload, `upload.Uploader`)."""
    out = Path(out)
    progress = progress or Progress(disable=True)
    if overwrite:
        for name in (INDEX_FILE, DROPPED_FILE, ".journal", *SPLITS):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    available = source.splits()
    wanted = splits or available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise LauncherError(f"split(s) {', '.join(unknown)} not in the source, which has: {', '.join(available)}")
    order = [s for s in WRITE_ORDER if s in wanted]
    header = {"format": FORMAT, "settings": asdict(settings), "source": source.describe()}
    dedup = _Dedup()
    pool = _Pool(workers)
    journals: dict[str, Journal] = {}
    try:
        for pos, split in enumerate(order):
            journal = journals[split] = Journal(out, split, header, on_shard)
            kept, bad = journal.resume()
            if kept or bad:
                progress.log(f"resuming {label}{split}: {kept} finished shard(s) verified and kept"
                             + (", the next one failed its sha256 check and is rewritten" if bad else ""))
            if journal.complete and pos == len(order) - 1:
                continue  # no later split needs this one's ids for de-duplication
            _shard_split(source, split, out, settings, journal, dedup, pool, progress, label)
    finally:
        pool.shutdown()
    return _write_index(out, header, journals)


def _shard_split(source: Source, split: str, out: Path, settings: ShardSettings, journal: Journal, dedup: _Dedup,
                 pool: _Pool, progress: Progress, label: str = "") -> None:
    """Shard one split from where its journal stopped. Clips before `journal.next_item` are in verified
    shards: they are only read for de-duplication, never decoded."""
    skip = journal.next_item
    drops: list[Drop] = []  # decided but not yet journalled
    seen = [0]
    task = progress.add_task(label + split, total=source.count(split), hours=0.0, speed=0.0)

    def tasks() -> Iterator[tuple]:
        for item, clip in enumerate(source.clips(split)):
            seen[0] = item + 1
            drop, text = _precheck(split, item, clip, dedup)
            if item < skip or drop:
                drops.extend([drop] if drop and item >= skip else [])
                progress.advance(task)
                continue
            yield (item, clip.id, clip.origin, text, clip.audio, settings.n_mels, settings.language, clip.speaker)

    if journal.complete:
        for _ in tasks():
            pass
        progress.remove_task(task)
        return
    writer = ShardWriter(out, split, len(journal.shards), settings.shard_bytes)
    started, audio_s, next_item = time.monotonic(), 0.0, skip
    for kind, item, cid, *rest in pool.map(_chunks(tasks(), CHUNK)):
        if kind == "drop":
            drops.append(Drop(split, item, cid, *rest))
        else:
            mel, meta, seconds = rest
            finished = writer.add(sample_key(cid), [(MEL, mel), (META, meta)], seconds)
            if finished:
                _journal_shard(journal, finished, next_item, drops)
            audio_s += seconds
        next_item = item + 1
        progress.update(task, advance=1, hours=audio_s / 3600,
                        speed=audio_s / max(time.monotonic() - started, 1e-9))
    finished = writer.close()
    if finished:
        _journal_shard(journal, finished, seen[0], drops)
    journal.record(None, seen[0], sorted(drops, key=lambda d: d.item), complete=True)


def _journal_shard(journal: Journal, shard: dict, next_item: int, drops: list[Drop]) -> None:
    """Journal a finished shard with the drops among the clips before `next_item`."""
    mine = sorted((d for d in drops if d.item < next_item), key=lambda d: d.item)
    drops[:] = [d for d in drops if d.item >= next_item]
    journal.record(shard, next_item, mine)


def _write_index(out: Path, header: dict, journals: dict[str, Journal]) -> dict:
    splits, drops = {}, []
    for split in SPLITS:
        if split not in journals:
            continue
        j = journals[split]
        shards = [{k: s[k] for k in ("path", "samples", "seconds", "bytes", "sha256", "pieces") if k in s}
                  for s in j.shards]  # a journal from before pieces has none
        splits[split] = {"samples": sum(s["samples"] for s in shards),
                         "seconds": round(sum(s["seconds"] for s in shards), 4),
                         "dropped": len(j.drops), "shards": shards}
        drops.extend(sorted(j.drops, key=lambda d: d.item))
    settings = header["settings"]
    index = {
        "features": features_entry(settings["n_mels"]),
        "source": {**header["source"], "language": settings["language"]},
        "text": "source sentence, Unicode NFC, whitespace collapsed",
        "shard_bytes": settings["shard_bytes"],
        "splits": splits,
        "dropped": dict(sorted(Counter(d.reason for d in drops).items())),
    }
    write_index(out, index, [{"id": d.id, "split": d.split, "reason": d.reason, "detail": d.detail} for d in drops])
    return index


def print_summary(console, runs: list[tuple[str, Path, dict]]) -> None:
    """The table `launcher shard` ends with, one for all its languages: samples, hours, shards, MB and drops per
    split (`runs`: language, folder and index of each)."""
    from rich.table import Table

    several = len(runs) > 1
    title = f"shards in {runs[0][1]}" if not several else "shards in " + ", ".join(str(out) for _, out, _ in runs)
    table = Table(*(["language"] if several else []), "split", "samples", "hours", "shards", "MB", "dropped",
                  title=title)
    for language, _, index in runs:
        for name, split in index["splits"].items():
            table.add_row(*([language] if several else []), name, f"{split['samples']:,}",
                          f"{split['seconds'] / 3600:.3f}", str(len(split["shards"])),
                          f"{sum(s['bytes'] for s in split['shards']) / 1e6:.1f}", str(split["dropped"]))
    console.print(table)
    for language, out, index in runs:
        dropped = index["dropped"]
        if dropped:
            console.print(f"[yellow]{language + ': ' if several else ''}dropped {sum(dropped.values())} clip(s)[/]: "
                          + ", ".join(f"{reason} {n}" for reason, n in dropped.items())
                          + f"; each is listed with its reason in {out / 'dropped.jsonl'}")
        console.print(f"index: {out / 'index.json'}")
