"""Streaming training data from shards: every sample once per epoch, the same number of steps on every rank.

The plan, per epoch e (all of it follows from the seed, so every rank computes it alone, without talking):

1. the epoch's sequence: the training samples of the run's shard sets in their shares (`launcher.mixing.Mix`:
   with one set, its shards in a seeded order for epoch e, their samples in that order; with several, each set's
   share of its own passes, interleaved evenly), N samples in all (the counts come from index.json, nothing is read
   to plan);
2. the sequence is cut into one contiguous range per rank (sizes differ by at most one) and each rank's
   range into one contiguous range per loader worker, so a worker reads only the shards its range covers (with
   several sets, a run of each set's shards, read side by side);
3. a worker reads its range in blocks of `shuffle_buffer` samples and takes each block in a seeded order;
4. its clips, in that order, become training samples: one each, or with `data.pack` windows of several
   (launcher/packing.py), which never span two epochs nor two languages. A sample's labels (launcher/labels.py)
   start with its own set's language token and take the timestamp layout and a prompt by seeded draws that depend
   on the sample's first clip only.

Each worker's stream runs on into the next epoch, so no rank ever runs dry: a run lasts `max_steps` optimizer
steps on every rank (never "until the data ends", which hangs DeepSpeed when ranks hold unequal data), and
within each epoch every clip is seen exactly once (with several sets: every clip of a set once per pass over
that set).

Resuming on the same number of ranks and workers replays the plan and skips the batches already taken, without
decoding them: the run goes on exactly as if never stopped. On another number (a 2-GPU run resumed on 1, say),
each checkpoint's record of what every worker had trained on (`TrainedPositions`) gives a new plan: the epochs still
open keep only their unseen positions, cut as above among the new ranks and workers (`DataPlan`, `resume_position`).
"""

from __future__ import annotations

import heapq
import json
import random
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.distributed import contiguous_range
from launcher.errors import LauncherError
from launcher.features import join_features, stack_features
from launcher.labels import MAX_LABEL_TOKENS, LabelEncoder, Segment
from launcher.mixing import Mix, Read
from launcher.packing import ClipRef, Packer, PackSettings, Window
from launcher.shards import BadShard, Shard, ShardIndex, load_mel, mel_frames, read_samples

LABEL_BUCKET = 32  # label lengths are padded to a multiple of this: few distinct shapes, kernels and allocations reused


def train_shards(index: ShardIndex, split: str) -> list[Shard]:
    """The split's non-empty shards, in index order."""
    shards = [s for s in index.shards(split) if s.samples]
    if not shards:
        raise LauncherError(f"split {split!r} in {index.folder} has no samples")
    return shards


@dataclass
class DataPlan:
    """Where a stream's plan starts. A fresh run starts at epoch 0 with nothing left out. After a resume on another
    number of ranks or loader workers, it starts at the earliest epoch any old worker was still in, with the
    positions already trained on in each such epoch left out of that epoch's sequence (`excluded`, one boolean
    per position), and `start_batches` batches of the run already behind it."""

    start_epoch: int = 0
    start_batches: int = 0
    excluded: dict[int, np.ndarray] = field(default_factory=dict)

    def state(self) -> dict:
        return {"start_epoch": self.start_epoch, "start_batches": self.start_batches,
                "excluded": {e: torch.from_numpy(np.packbits(m)) for e, m in self.excluded.items()}}

    @classmethod
    def from_state(cls, state: dict, total: int) -> DataPlan:
        return cls(state["start_epoch"], state["start_batches"],
                   {e: np.unpackbits(m.numpy(), count=total).astype(bool) for e, m in state["excluded"].items()})

    def positions(self, epoch: int, total: int) -> Sequence[int]:
        """The epoch's sequence: positions 0..total-1 (`mixing.Mix`), less those left out."""
        return np.flatnonzero(~self.excluded[epoch]) if epoch in self.excluded else range(total)


def worker_positions(plan: DataPlan, total: int, epoch: int, world_size: int, rank: int, workers: int,
                     worker: int) -> Sequence[int]:
    """The sorted positions of one worker's part of an epoch: its rank's contiguous range of the epoch's sequence,
    and its own contiguous range of that."""
    sequence = plan.positions(epoch, total)
    lo, hi = contiguous_range(len(sequence), world_size, rank)
    w_lo, w_hi = contiguous_range(hi - lo, workers, worker)
    return sequence[lo + w_lo: lo + w_hi]


class TrainedPositions:
    """What one rank has trained on, per loader worker: the epoch the worker is in (its parts of all earlier epochs
    are done, dropped samples included) and the positions of that epoch in batches the loop has taken. Saved in
    every checkpoint, it lets a resume on another number of ranks or workers leave out exactly what was seen."""

    def __init__(self, workers: int, epoch: int):
        self.epochs = [epoch] * workers
        self.seen: list[list[int]] = [[] for _ in range(workers)]

    def update(self, batch: dict) -> None:
        w = batch["worker"]
        for epoch, position in batch["positions"]:
            if epoch > self.epochs[w]:
                self.epochs[w], self.seen[w] = epoch, []
            self.seen[w].append(position)

    def state(self) -> list[dict]:
        return [{"epoch": e, "positions": torch.tensor(p, dtype=torch.int64)} for e, p in zip(self.epochs, self.seen,
                                                                                                strict=True)]

    @classmethod
    def from_state(cls, state: list[dict]) -> TrainedPositions:
        out = cls(len(state), 0)
        out.epochs = [w["epoch"] for w in state]
        out.seen = [w["positions"].tolist() for w in state]
        return out


def loader_state(plan: DataPlan, consumed: TrainedPositions, *, world_size: int, rank: int, workers: int) -> dict:
    """One rank's loader position, as saved in its rank-R.pt (tensors and plain values: weights_only loads it)."""
    return {"world_size": world_size, "rank": rank, "workers": workers, "plan": plan.state(),
            "consumed": consumed.state()}


def resume_position(states: list[dict], total: int, *, world_size: int, rank: int, workers: int,
                    batches: int) -> tuple[DataPlan, TrainedPositions, int]:
    """(plan, consumed, batches to skip) for this rank from every old rank's `loader_state`, `batches` being the
    batches the run had taken. Same ranks and workers: the same plan, replayed past what was taken (bitwise the
    uninterrupted run). Otherwise a new plan from the earliest epoch still open, leaving out what any old worker
    trained on (its whole part of the epochs it had finished), so no sample is repeated or skipped."""
    old = states[0]
    old_plan = DataPlan.from_state(old["plan"], total)
    if old["world_size"] == world_size and old["workers"] == workers:
        return old_plan, TrainedPositions.from_state(states[rank]["consumed"]), batches - old_plan.start_batches
    workers_then = [(st, w, part) for st in states for w, part in enumerate(st["consumed"])]
    first = min(part["epoch"] for _, _, part in workers_then)
    last = max(part["epoch"] for _, _, part in workers_then)
    excluded = {e: m.copy() for e, m in old_plan.excluded.items() if e >= first}
    for epoch in range(first, last + 1):
        mask = excluded.setdefault(epoch, np.zeros(total, dtype=bool))
        for st, w, part in workers_then:
            if part["epoch"] > epoch:
                mask[np.asarray(worker_positions(old_plan, total, epoch, st["world_size"], st["rank"], st["workers"],
                                                 w), dtype=np.int64)] = True
            elif part["epoch"] == epoch:
                mask[part["positions"].numpy()] = True
    return DataPlan(first, batches, excluded), TrainedPositions(workers, first), 0


class ShardStream(IterableDataset):
    """One rank's endless stream of training samples; see the module docstring for the plan."""

    def __init__(self, sets: Mix | list[Shard], labels: LabelEncoder, *, rank: int, world_size: int, seed: int,
                 shuffle: bool, shuffle_buffer: int, batch_size: int, plan: DataPlan | None = None,
                 skip_batches: int = 0, verify: bool = False, on_bad_data: str = "skip",
                 pack: PackSettings | None = None, timestamp_probability: float = 0.0,
                 prompt_probability: float = 0.0, languages: Sequence[str] | None = None):
        """`sets`: the run's `Mix`, or one set's shards; `languages`: each set's Whisper language code (default: the
        label encoder's language for every set)."""
        self.mix = sets if isinstance(sets, Mix) else Mix([sets], [1.0], seed=seed, shuffle=shuffle)
        self.labels = labels
        self.languages = list(languages) if languages else [None] * len(self.mix.sets)
        self.pack = pack
        self.timestamp_probability, self.prompt_probability = timestamp_probability, prompt_probability
        self._warned_no_speaker = False
        self.verify, self.on_bad_data = verify, on_bad_data
        self._checked: dict[Shard, BadShard | None] = {}  # sha256 verdicts, per worker process
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.buffer, self.batch_size = shuffle, max(1, shuffle_buffer), batch_size
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
        if self.on_bad_data == "stop":
            raise LauncherError(f"{error} (data.on_bad_data: stop)")
        print(f"warning: rank {self.rank} worker {worker}: skipped {error.skipped} sample(s): {error}",
              file=sys.stderr, flush=True)
        return error.skipped

    def _check(self, shard: Shard) -> None:
        """sha256 against index.json, hashed once per worker; a bad shard stays bad for every later epoch."""
        if shard not in self._checked:
            problem = shard.problem()
            self._checked[shard] = BadShard(f"shard {shard.path} {problem}", shard.samples) if problem else None
        if self._checked[shard] is not None:
            raise self._checked[shard]

    def epoch_items(self, epoch: int, worker: int, workers: int) -> list[list[Read]]:
        """This worker's part of an epoch: per set, the shards to read in order (`mixing.Read`)."""
        positions = worker_positions(self.plan, self.total, epoch, self.world_size, self.rank, workers, worker)
        return self.mix.reads(epoch, positions)

    def _read(self, reads: list[Read], worker: int, counts: dict) -> Iterator[tuple]:
        """One set's samples of `reads` in order, as (epoch position, set, shard name, key, mel, meta); bad data is
        counted into `counts`."""
        for r in reads:
            try:
                if self.verify:
                    self._check(r.shard)
            except BadShard as e:
                counts["bad"] += self._bad(BadShard(str(e), skipped=len(r.wanted)), worker)
                continue
            try:
                for sample in read_samples(r.shard.path, r.wanted):
                    at = int(r.positions[np.searchsorted(r.wanted, sample.position)])
                    yield at, r.set, r.shard.path.name, sample.key, sample.mel, sample.meta
            except BadShard as e:
                counts["bad"] += self._bad(e, worker)

    def _blocks(self, epoch: int, worker: int, workers: int, counts: dict) -> Iterator[list[tuple]]:
        """This worker's samples of one epoch, in the epoch's order (the sets read side by side), in blocks of
        `shuffle_buffer`; bad data is counted into `counts`."""
        block: list = []
        per_set = [self._read(reads, worker, counts) for reads in self.epoch_items(epoch, worker, workers)]
        for sample in heapq.merge(*per_set, key=lambda x: x[0]):
            block.append(sample)
            if len(block) == self.buffer:
                yield block
                block = []
        if block:
            yield block

    def _clips(self, block: list[tuple], epoch: int, worker: int, counts: dict) -> Iterator[ClipRef]:
        """The usable clips of a block; bad data and labels that cannot fit are counted into `counts`."""
        for position, set_no, shard_name, key, mel, meta in block:
            try:
                meta = json.loads(meta)
                text_ids = self.labels.text_ids(meta["text"])
                clip = ClipRef(meta["id"], epoch, position, text_ids, float(meta.get("seconds", 0.0)), mel,
                               speaker=meta.get("speaker"), language=self.languages[set_no])
                if self.pack is not None:
                    clip.frames = mel_frames(mel)
            except (ValueError, KeyError, TypeError) as e:
                counts["bad"] += self._bad(BadShard(f"sample {key!r} of shard {shard_name}: bad json or features "
                                                    f"({e})", 1), worker)
                continue
            if not self.labels.fits([len(text_ids)]):
                counts["dropped"] += 1
                continue
            if clip.speaker is None and self.pack is not None and self.pack.same_speaker \
                    and not self._warned_no_speaker:
                self._warned_no_speaker = True
                print(f"warning: rank {self.rank} worker {worker}: shard {shard_name} has clips without a speaker id "
                      "(sharded before speakers were recorded, or the source has none); with "
                      "data.pack.same_speaker they are not joined to other clips", file=sys.stderr, flush=True)
            yield clip

    def _windows(self, worker: int, workers: int, counts: dict) -> Iterator[Window]:
        """This worker's endless stream of windows (one clip each without packing): epochs one after another,
        each block of clips in a seeded order."""
        epoch, packer = self.plan.start_epoch, Packer(self.pack, self.labels.fits)
        while True:
            produced = 0
            for block_no, block in enumerate(self._blocks(epoch, worker, workers, counts)):
                if self.shuffle:
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
                                    "(all unreadable, or labels over 448 tokens)")
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
            timestamps, prompted = draw.random() < self.timestamp_probability, draw.random() < self.prompt_probability
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


def collate(samples: list[dict], start_token: int | None = None, pad_token: int | None = None,
            learn_language: bool = True) -> dict:
    """A batch as it travels to the device: the stored float16 frames (`stack_features`; `features.pad_batch` makes
    Whisper's 30 s window on the device), labels padded with -100 (ignored by the loss) to a multiple of
    LABEL_BUCKET tokens, and what the loop records about the samples (`ids` of every clip, `windows`: the clips of
    each sample).

    With prompts (`labels.LabelEncoder.prompt`), or with `learn_language` false (`model.train_language_token`: the
    language token is read by the decoder but its target is -100), the batch also carries the decoder inputs, which
    the model would otherwise make from the labels: [prompt..., start, labels[:-1]], the prompt's targets -100.
    `start_token` and `pad_token` are needed then (`train_loader` gives them)."""
    explicit = not learn_language or any(s["prompt"] for s in samples)
    lengths = [len(s["prompt"]) + len(s["labels"]) for s in samples]
    width = min(-(-max(lengths) // LABEL_BUCKET) * LABEL_BUCKET, MAX_LABEL_TOKENS)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        labels[i, len(s["prompt"]): lengths[i]] = torch.tensor(s["labels"])
    batch = {}
    if explicit:
        if start_token is None or pad_token is None:
            raise ValueError("a batch with prompts or an unlearned language token needs start_token and pad_token")
        inputs = torch.full((len(samples), width), pad_token, dtype=torch.long)
        for i, s in enumerate(samples):  # what the model reads at each position: the sequence shifted right
            inputs[i, : lengths[i]] = torch.tensor([*s["prompt"], start_token, *s["labels"][:-1]])
            if not learn_language:
                labels[i, len(s["prompt"])] = -100  # labels start with the language token
        batch["decoder_input_ids"] = inputs
    features, frames, pads = stack_features([s["features"] for s in samples])
    return {**batch, "features": features, "frames": frames, "pads": pads, "labels": labels,
            "tokens": sum(len(s["labels"]) for s in samples), "ids": [i for s in samples for i in s["ids"]],
            "windows": [s["ids"] for s in samples], "epochs": [s["epoch"] for s in samples for _ in s["ids"]],
            "positions": [p for s in samples for p in s["positions"]], "worker": samples[0]["worker"],
            "seconds": sum(s["seconds"] for s in samples),
            "epoch": max(s["epoch"] for s in samples), "dropped_long": sum(s["dropped_long"] for s in samples),
            "bad_data": sum(s["bad_data"] for s in samples)}


def _worker_ignores_stop_signals(_: int) -> None:
    """SIGTERM/SIGINT are for the rank's main process (it saves and leaves); a worker that died on them would
    break the batches the last step still needs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 learn_language: bool = True) -> DataLoader:
    batch = partial(collate, start_token=stream.labels.start, pad_token=stream.labels.eot,
                    learn_language=learn_language)
    return DataLoader(stream, batch_size=stream.batch_size, collate_fn=batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=_worker_ignores_stop_signals if num_workers else None)
