"""The plan of an epoch: which positions of its sequence each rank and loader worker reads, what a rank has
trained on (saved in every checkpoint), and where a resumed run starts, on the same or another number of ranks
(the package docstring has the whole plan)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from launcher.distributed import contiguous_range


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
