"""Streaming training data from shards: every sample once per epoch, the same number of steps on every rank.

The plan, per epoch e (all of it follows from the seed, so every rank computes it alone, without talking):

1. the split's shards are put in a seeded order for epoch e; their samples, in that order, form the
   epoch's global sequence of N samples (the counts come from index.json, nothing is read to plan);
2. the sequence is cut into one contiguous range per rank (sizes differ by at most one) and each rank's
   range into one contiguous range per loader worker, so a worker reads only the shards its range covers;
3. a worker reads its range in blocks of `shuffle_buffer` samples and yields each block in a seeded order.

Each worker's stream runs on into the next epoch, so no rank ever runs dry: a run lasts `max_steps` optimizer
steps on every rank (never "until the data ends", which hangs DeepSpeed when ranks hold unequal data), and
within each epoch every sample is seen exactly once.

Resuming on the same number of ranks and workers replays the plan and skips the batches already taken, without
decoding them: the run goes on exactly as if never stopped. On another number (a 2-GPU run resumed on 1, say),
each checkpoint's record of what every worker had trained on (`TrainedPositions`) gives a new plan: the epochs still
open keep only their unseen positions, cut as above among the new ranks and workers (`DataPlan`, `resume_position`).
"""

from __future__ import annotations

import json
import random
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.distributed import contiguous_range
from launcher.errors import LauncherError
from launcher.features import stack_features
from launcher.shards import BadShard, Shard, ShardIndex, load_mel, read_samples
from launcher.text import normalize_target

MAX_LABEL_TOKENS = 448  # Whisper's decoder has 448 positions
LABEL_BUCKET = 32  # label lengths are padded to a multiple of this: few distinct shapes, kernels and allocations reused


def train_shards(index: ShardIndex, split: str) -> list[Shard]:
    """The split's non-empty shards, in index order."""
    shards = [s for s in index.shards(split) if s.samples]
    if not shards:
        raise LauncherError(f"split {split!r} in {index.folder} has no samples")
    return shards


def epoch_shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


class LabelEncoder:
    """Transcript -> label ids: [<|lang|>, <|task|>, <|notimestamps|>, text..., <|endoftext|>].

    The model puts <|startoftranscript|> in front itself (decoder_start_token_id) when it shifts labels right
    into decoder inputs, so labels start after it, as in the event's data collator."""

    def __init__(self, tokenizer, language: str, task: str, normalize: bool, max_tokens: int = MAX_LABEL_TOKENS):
        tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        self.prefix = tokenizer.prefix_tokens[1:]
        self.eot = tokenizer.eos_token_id
        self.tokenizer, self.normalize, self.max_tokens = tokenizer, normalize, max_tokens

    def __call__(self, text: str) -> list[int] | None:
        """Label ids, or None when they would not fit the decoder (dropped, never truncated)."""
        text = normalize_target(text) if self.normalize else text
        ids = [*self.prefix, *self.tokenizer.encode(" " + text.strip(), add_special_tokens=False), self.eot]
        return ids if len(ids) + 1 <= self.max_tokens else None  # +1: the start token the model prepends


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
        """The epoch's sequence: positions 0..total-1 of its shard order, less those left out."""
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

    def __init__(self, shards: list[Shard], labels: LabelEncoder, *, rank: int, world_size: int, seed: int,
                 shuffle: bool, shuffle_buffer: int, batch_size: int, plan: DataPlan | None = None,
                 skip_batches: int = 0, verify: bool = False, on_bad_data: str = "skip"):
        self.shards, self.labels = shards, labels
        self.verify, self.on_bad_data = verify, on_bad_data
        self._checked: dict[Shard, BadShard | None] = {}  # sha256 verdicts, per worker process
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.buffer, self.batch_size = shuffle, max(1, shuffle_buffer), batch_size
        self.total = sum(s.samples for s in shards)
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

    def epoch_items(self, epoch: int, worker: int, workers: int) -> Iterator[tuple[Shard, Sequence[int], int]]:
        """(shard, sorted in-shard positions, the shard's offset in the epoch's sequence) for this worker's part
        of the epoch, in shard order."""
        positions = worker_positions(self.plan, self.total, epoch, self.world_size, self.rank, workers, worker)
        offset = 0
        for shard in epoch_shard_order(self.shards, self.seed, epoch, self.shuffle):
            if isinstance(positions, range):
                wanted = range(max(positions.start, offset) - offset,
                               max(min(positions.stop, offset + shard.samples) - offset, 0))
            else:
                i, j = np.searchsorted(positions, [offset, offset + shard.samples])
                wanted = positions[i:j] - offset
            if len(wanted):
                yield shard, wanted, offset
            offset += shard.samples

    def _blocks(self, epoch: int, worker: int, workers: int, bad: list[int]) -> Iterator[list[tuple]]:
        """This worker's samples of one epoch in blocks of `shuffle_buffer`; bad data is counted into `bad`."""
        block: list = []
        for shard, wanted, offset in self.epoch_items(epoch, worker, workers):
            try:
                if self.verify:
                    self._check(shard)
            except BadShard as e:
                bad[0] += self._bad(BadShard(str(e), skipped=len(wanted)), worker)
                continue
            try:
                for sample in read_samples(shard.path, wanted):
                    block.append((shard.path.name, offset + sample.position, sample.key, sample.mel, sample.meta))
                    if len(block) == self.buffer:
                        yield block
                        block = []
            except BadShard as e:
                bad[0] += self._bad(e, worker)
        if block:
            yield block

    def samples(self, worker: int, workers: int) -> Iterator[dict]:
        """This worker's endless stream: epochs one after another, each block in a seeded order. Samples whose
        labels do not fit, and bad data, are left out and counted in the next sample's `dropped_long` and
        `bad_data`."""
        to_skip = self._skip_samples(worker, workers)
        epoch, dropped, bad = self.plan.start_epoch, 0, [0]
        while True:
            produced = 0
            for block_no, block in enumerate(self._blocks(epoch, worker, workers, bad)):
                if self.shuffle:
                    random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}:{block_no}").shuffle(block)
                for shard_name, position, key, mel, meta in block:
                    try:
                        meta = json.loads(meta)
                        labels = self.labels(meta["text"])
                    except (ValueError, KeyError, TypeError) as e:
                        bad[0] += self._bad(BadShard(f"sample {key!r} of shard {shard_name}: bad json ({e})", 1),
                                            worker)
                        continue
                    if labels is None:
                        dropped += 1
                        continue
                    produced += 1
                    if to_skip:  # delivered before the checkpoint, drops included: count nothing twice
                        to_skip, dropped, bad[0] = to_skip - 1, 0, 0
                        continue
                    try:
                        features = torch.from_numpy(load_mel(mel))
                    except (ValueError, OSError, EOFError) as e:
                        bad[0] += self._bad(BadShard(f"sample {key!r} of shard {shard_name}: unreadable features "
                                                    f"({e})", 1), worker)
                        continue
                    yield {"id": meta["id"], "features": features, "labels": labels, "epoch": epoch,
                           "position": position, "worker": worker, "dropped_long": dropped, "bad_data": bad[0]}
                    dropped, bad[0] = 0, 0
            if produced == 0 and epoch not in self.plan.excluded:  # a worker's rest of an epoch may be empty
                raise LauncherError(f"rank {self.rank} worker {worker}: no usable sample in its part of the data "
                                    "(all unreadable, or labels over 448 tokens)")
            epoch += 1

    def worker_stream(self, loader_worker: int, workers: int) -> Iterator[dict]:
        """The stream of DataLoader worker `loader_worker`. DataLoader takes batch i from worker i % workers from
        its start, so after skipping k batches its worker w plays the plan's worker (w + k) % workers: the batches
        then come in the uninterrupted run's order."""
        return self.samples((loader_worker + self.skip_batches) % workers, workers)

    def __iter__(self) -> Iterator[dict]:
        return self.worker_stream(*self._worker())


def collate(samples: list[dict], pad_token_id: int = -100) -> dict:
    """A batch as it travels to the device: the stored float16 frames (`stack_features`; `features.pad_batch` makes
    Whisper's 30 s window on the device), labels padded with -100 (ignored by the loss) to a multiple of
    LABEL_BUCKET tokens, and what the loop records about the samples."""
    longest = max(len(s["labels"]) for s in samples)
    width = min(-(-longest // LABEL_BUCKET) * LABEL_BUCKET, MAX_LABEL_TOKENS)
    labels = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    for i, s in enumerate(samples):
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    features, frames, pads = stack_features([s["features"] for s in samples])
    return {"features": features, "frames": frames, "pads": pads, "labels": labels,
            "tokens": sum(len(s["labels"]) for s in samples), "ids": [s["id"] for s in samples],
            "epochs": [s["epoch"] for s in samples],
            "positions": [(s["epoch"], s["position"]) for s in samples], "worker": samples[0]["worker"],
            "epoch": max(s["epoch"] for s in samples), "dropped_long": sum(s["dropped_long"] for s in samples),
            "bad_data": sum(s["bad_data"] for s in samples)}


def _worker_ignores_stop_signals(_: int) -> None:
    """SIGTERM/SIGINT are for the rank's main process (it saves and leaves); a worker that died on them would
    break the batches the last step still needs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=stream.batch_size, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=_worker_ignores_stop_signals if num_workers else None)
