"""One rank's endless stream of training samples (the package docstring has the plan): shards read in the plan's
order, blocks shuffled, clips labelled (and with `data.pack` joined into windows)."""

from __future__ import annotations

import heapq
import json
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launcher.data.labels import LabelEncoder, Segment
from launcher.data.mixing import Mix, Read
from launcher.data.packing import FRAME_SECONDS, ClipRef, Packer, PackSettings, Window
from launcher.data.plan import DataPlan, worker_positions
from launcher.errors import LauncherError
from launcher.features import N_FRAMES, join_features
from launcher.shards.fetch import ShardFetcher
from launcher.shards.format import Shard
from launcher.shards.reader import BadShard, load_mel, mel_frames, read_samples


@dataclass(frozen=True)
class StreamSettings:
    """What shapes a rank's stream besides the data itself (`from_recipe`: the recipe's `data` section and seed)."""

    seed: int
    batch_size: int
    shuffle: bool = True
    shuffle_buffer: int = 1000
    verify: bool = False  # sha256 of each shard against index.json before reading it
    on_bad_data: str = "skip"  # or "stop"
    pack: PackSettings | None = None
    timestamp_probability: float = 0.0
    prompt_probability: float = 0.0
    max_frames: int = N_FRAMES  # the model's input window (`model.input_frames`): a longer clip is dropped, counted
    remote_cache: str | None = None  # sets read from URLs: where fetched shards are kept (`shards.fetch`)
    remote_cache_bytes: int = 0
    prefetch: int = 2  # remote shards fetched ahead of the one being read

    @classmethod
    def from_recipe(cls, recipe, max_frames: int = N_FRAMES) -> StreamSettings:
        d = recipe.data
        pack = PackSettings.from_seconds(d.pack.max_seconds or max_frames * FRAME_SECONDS, d.pack.gap_seconds,
                                         d.pack.same_speaker, d.pack.single_probability) if d.pack.enabled else None
        return cls(seed=recipe.seed, batch_size=d.batch_size_per_gpu, shuffle=d.shuffle,
                   shuffle_buffer=d.shuffle_buffer, verify=d.verify_shards, on_bad_data=d.on_bad_data, pack=pack,
                   timestamp_probability=d.timestamp_probability, prompt_probability=d.prompt_probability,
                   max_frames=max_frames, remote_cache=d.remote_cache, remote_cache_bytes=int(d.remote_cache_gb * 1e9),
                   prefetch=d.prefetch_shards)


@dataclass(frozen=True)
class StoredSample:
    """One sample as read from a shard, before its labels are made."""

    position: int  # in the epoch's sequence
    set: int  # which shard set (`Mix.sets`) it comes from
    shard: str  # the shard's file name, for messages
    key: str
    mel: bytes  # KEY.mel.npy
    meta: bytes  # KEY.json


class ShardStream(IterableDataset):
    """One rank's endless stream of training samples; see the package docstring for the plan."""

    def __init__(self, sets: Mix | list[Shard], labels: LabelEncoder, settings: StreamSettings, *, rank: int,
                 world_size: int, plan: DataPlan | None = None, skip_batches: int = 0,
                 languages: Sequence[str] | None = None):
        """`sets`: the run's `Mix`, or one set's shards; `languages`: each set's Whisper language code (default: the
        label encoder's language for every set); `plan` and `skip_batches`: where a resumed run starts
        (`plan.resume_position`)."""
        self.settings = settings
        self.mix = sets if isinstance(sets, Mix) else Mix([sets], [1.0], seed=settings.seed, shuffle=settings.shuffle)
        self.labels = labels
        self.languages = list(languages) if languages else [None] * len(self.mix.sets)
        self.pack = settings.pack
        self._warned_no_speaker = self._warned_too_long = False
        self._checked: dict[Shard, BadShard | None] = {}  # sha256 verdicts, per worker process
        self._fetcher: ShardFetcher | None = None  # per worker process: made where it runs
        self._fetcher_pid = 0
        self.rank, self.world_size, self.seed = rank, world_size, settings.seed
        self.buffer, self.batch_size = max(1, settings.shuffle_buffer), settings.batch_size
        self.total = self.mix.total
        self.plan = plan or DataPlan()
        self.skip_batches = skip_batches
        if self.total < world_size:
            raise LauncherError(f"{self.total} training samples cannot feed {world_size} ranks")

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _skip_samples(self, worker: int, workers: int) -> int:
        """Samples this worker delivered in the first `skip_batches` batches of the rank since the plan started
        (DataLoader takes whole batches from workers in turn: batch i comes from worker i % workers)."""
        return len(range(worker, self.skip_batches, workers)) * self.batch_size

    def _bad(self, error: BadShard, worker: int) -> int:
        """Report bad data by shard and key; stop the run or skip it, per the recipe. Returns samples lost."""
        if self.settings.on_bad_data == "stop":
            raise LauncherError(f"{error} (data.on_bad_data: stop)")
        print(f"warning: rank {self.rank} worker {worker}: skipped {error.skipped} sample(s): {error}",
              file=sys.stderr, flush=True)
        return error.skipped

    def _check(self, shard: Shard) -> None:
        """sha256 against index.json, hashed once per worker; a bad shard stays bad for every later epoch. A remote
        shard is checked as it arrives (`fetch`)."""
        if shard not in self._checked and not shard.remote:
            problem = shard.problem()
            self._checked[shard] = BadShard(f"shard {shard.path} {problem}", shard.samples) if problem else None
        if self._checked.get(shard) is not None:
            raise self._checked[shard]

    def fetcher(self) -> ShardFetcher:
        """This process's fetcher (a loader worker forked from a process that had one makes its own: threads do
        not survive a fork)."""
        if self._fetcher is None or self._fetcher_pid != os.getpid():
            s = self.settings
            self._fetcher = ShardFetcher(Path(s.remote_cache) if s.remote_cache else None, s.remote_cache_bytes,
                                         prefetch=s.prefetch, verify=s.verify, process=True)
            self._fetcher_pid = os.getpid()
        return self._fetcher

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fetcher": None}

    def _open(self, shard: Shard) -> BinaryIO:
        """The shard's bytes: its file, or (a remote set's) its copy, checked as it arrives; a shard that stays
        unreachable is a bad shard, for every later epoch too."""
        try:
            return self.fetcher().open(shard)
        except BadShard as e:
            self._checked[shard] = e
            raise

    def epoch_items(self, epoch: int, worker: int, workers: int) -> list[list[Read]]:
        """This worker's part of an epoch: per set, the shards to read in order (`mixing.Read`)."""
        positions = worker_positions(self.plan, self.total, epoch, self.world_size, self.rank, workers, worker)
        return self.mix.reads(epoch, positions)

    def _read(self, lane: int, reads: list[Read], then: list[Read], worker: int, counts: dict
              ) -> Iterator[StoredSample]:
        """Set `lane`'s samples of `reads` in order (`then`: its reads of the next epoch, fetched ahead as well); bad
        data is counted into `counts`."""
        self.fetcher().ahead([r.shard for r in reads + then], lane)
        for r in reads:
            try:
                if self.settings.verify or r.shard.remote:
                    self._check(r.shard)
                file = self._open(r.shard)
            except BadShard as e:
                counts["bad"] += self._bad(BadShard(str(e), skipped=len(r.wanted)), worker)
                continue
            try:
                for sample in read_samples(file, r.wanted):
                    at = int(r.positions[np.searchsorted(r.wanted, sample.position)])
                    yield StoredSample(at, r.set, r.shard.name, sample.key, sample.mel, sample.meta)
            except BadShard as e:
                if r.shard.remote:  # its bytes stopped coming or were not its own: not read again
                    self._checked[r.shard] = BadShard(str(e), len(r.wanted))
                counts["bad"] += self._bad(e, worker)
            finally:
                self.fetcher().release(r.shard, file)

    def _blocks(self, epoch: int, worker: int, workers: int, counts: dict) -> Iterator[list[StoredSample]]:
        """This worker's samples of one epoch, in the epoch's order (the sets read side by side), in blocks of
        `shuffle_buffer`; bad data is counted into `counts`."""
        block: list = []
        following = self.epoch_items(epoch + 1, worker, workers)  # so a remote set's next epoch is prefetched too
        per_set = [self._read(lane, reads, then, worker, counts) for lane, (reads, then) in
                   enumerate(zip(self.epoch_items(epoch, worker, workers), following, strict=True))]
        for sample in heapq.merge(*per_set, key=lambda x: x.position):
            block.append(sample)
            if len(block) == self.buffer:
                yield block
                block = []
        if block:
            yield block

    def _clips(self, block: list[StoredSample], epoch: int, worker: int, counts: dict) -> Iterator[ClipRef]:
        """The usable clips of a block; bad data, labels that cannot fit and audio longer than the model's window
        are counted into `counts`."""
        for sample in block:
            try:
                meta = json.loads(sample.meta)
                text_ids = self.labels.text_ids(meta["text"])
                clip = ClipRef(meta["id"], epoch, sample.position, text_ids, float(meta.get("seconds", 0.0)),
                               sample.mel, frames=mel_frames(sample.mel), speaker=meta.get("speaker"),
                               language=self.languages[sample.set])
            except (ValueError, KeyError, TypeError) as e:
                counts["bad"] += self._bad(BadShard(f"sample {sample.key!r} of shard {sample.shard}: bad json or "
                                                    f"features ({e})", 1), worker)
                continue
            if not self.labels.fits([len(text_ids)]) or clip.frames > self.settings.max_frames:
                if clip.frames > self.settings.max_frames and not self._warned_too_long:
                    self._warned_too_long = True
                    print(f"warning: rank {self.rank} worker {worker}: clip {clip.id} of shard {sample.shard} has "
                          f"{clip.frames} frames, more than the model's input window of {self.settings.max_frames}: "
                          "dropped, as every such clip (counted in dropped_long_labels)", file=sys.stderr, flush=True)
                counts["dropped"] += 1
                continue
            if clip.speaker is None and self.pack is not None and self.pack.same_speaker \
                    and not self._warned_no_speaker:
                self._warned_no_speaker = True
                print(f"warning: rank {self.rank} worker {worker}: shard {sample.shard} has clips without a speaker id "
                      "(sharded before speakers were recorded, or the source has none); with "
                      "data.pack.same_speaker they are not joined to other clips", file=sys.stderr, flush=True)
            yield clip

    def _windows(self, worker: int, workers: int, counts: dict) -> Iterator[Window]:
        """This worker's endless stream of windows (one clip each without packing): epochs one after another,
        each block of clips in a seeded order."""
        epoch, packer = self.plan.start_epoch, Packer(self.pack, self.labels.fits, self.seed)
        while True:
            produced = 0
            for block_no, block in enumerate(self._blocks(epoch, worker, workers, counts)):
                if self.settings.shuffle:
                    random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}:{block_no}").shuffle(block)
                for clip in self._clips(block, epoch, worker, counts):
                    for window in packer.add(clip):
                        produced += 1
                        yield window
                if self.pack is not None and self.pack.same_speaker:
                    for window in packer.flush():
                        produced += 1
                        yield window
            for window in packer.flush():
                produced += 1
                yield window
            if produced == 0 and epoch not in self.plan.excluded:  # a worker's rest of an epoch may be empty
                raise LauncherError(f"rank {self.rank} worker {worker}: no usable sample in its part of the data "
                                    "(all unreadable, labels over 448 tokens or audio longer than the model's window)")
            epoch += 1

    def samples(self, worker: int, workers: int) -> Iterator[dict]:
        """This worker's training samples: one per window. Dropped and bad samples are counted in the next
        sample's `dropped_long` and `bad_data`. Windows a resume skips are built (so the plan and the prompts
        run as uninterrupted) but not loaded."""
        to_skip = self._skip_samples(worker, workers)
        counts = {"dropped": 0, "bad": 0}
        previous: tuple[int, ...] = ()  # the last window's text, for prompts
        for window in self._windows(worker, workers, counts):
            first = window.clips[0]
            text = tuple(t for c in window.clips for t in c.text_ids)
            if to_skip:  # delivered before the checkpoint, drops included: count nothing twice
                to_skip, counts["dropped"], counts["bad"], previous = to_skip - 1, 0, 0, text
                continue
            try:
                features = self._features(window)
            except (ValueError, OSError, EOFError) as e:
                counts["bad"] += self._bad(BadShard(f"window of {[c.id for c in window.clips]}: unreadable features "
                                                    f"({e})", len(window.clips)), worker)
                continue
            # the same choices for the same window whatever the ranks and workers
            draw = random.Random(f"{self.seed}:{first.epoch}:{first.position}")
            timestamps, prompted = draw.random() < self.settings.timestamp_probability, \
                draw.random() < self.settings.prompt_probability
            segments = [Segment(c.text_ids, start, start + c.seconds) for c, start in zip(window.clips, window.starts(),
                                                                                          strict=True)]
            labels = self.labels.window(segments, timestamps=timestamps, language=first.language)
            yield {"ids": [c.id for c in window.clips], "features": features, "labels": labels,
                   "prompt": self.labels.prompt(previous, len(labels)) if prompted else [],
                   "epoch": first.epoch, "positions": [(c.epoch, c.position) for c in window.clips],
                   "seconds": sum(c.seconds for c in window.clips), "worker": worker,
                   "dropped_long": counts["dropped"], "bad_data": counts["bad"]}
            counts["dropped"], counts["bad"], previous = 0, 0, text

    @staticmethod
    def _features(window: Window) -> torch.Tensor:
        if len(window.clips) == 1:
            return torch.from_numpy(load_mel(window.clips[0].mel))
        joined = join_features([load_mel(c.mel) for c in window.clips], window.offsets)
        return torch.from_numpy(joined.astype(np.float16))

    def worker_stream(self, loader_worker: int, workers: int) -> Iterator[dict]:
        """The stream of DataLoader worker `loader_worker`. DataLoader takes batch i from worker i % workers from
        its start, so after skipping k batches its worker w plays the plan's worker (w + k) % workers: the batches
        then come in the uninterrupted run's order."""
        return self.samples((loader_worker + self.skip_batches) % workers, workers)

    def __iter__(self) -> Iterator[dict]:
        return self.worker_stream(*self._worker())
