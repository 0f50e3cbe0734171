"""Several shard sets in one run (one per language): how much of each an epoch holds, and where each sample lies.

A run trains on K sets (`data.shards`: one folder, or a list of `{path, weight, language}`). Set s has N_s
training samples and a share p_s of the mix: its weight over the weights' sum, or N_s^(1/T) over the sum of those
(`data.mix_temperature` T, as multilingual pre-training mixes languages: T=1 follows the sizes, larger T lifts the
small sets), or, with neither, N_s over the sum (the sets as they are).

An epoch holds E = sum N_s samples, of which q_s = p_s * E (rounded, at least 1, summing to E) come from set s.
Each set has its own endless sequence of passes: pass p is the set's shards in a seeded order for p, their samples
in shard order. Epoch e takes the set's samples q_s * e .. q_s * (e+1) - 1 of that sequence: a set with a share
above its size is upsampled (an epoch holds more than one pass of it), one below is seen over several epochs, and
every sample of a set comes once per pass over that set. In the epoch's sequence the sets are interleaved evenly
(set s's j-th sample sits at (j + 1/2) / q_s, ties to the lower set), the same for every epoch, so that any
contiguous range of it, the part a rank or a loader worker reads, holds each set in its share and, of each set, a
contiguous run of samples (whole shards read in order). With one set all of this is the identity: the epoch is the
set's pass e, in the order a single-set run always had.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from launcher.errors import LauncherError
from launcher.shards.format import Shard, ShardIndex


def train_shards(index: ShardIndex, split: str) -> list[Shard]:
    """The split's non-empty shards, in index order."""
    shards = [s for s in index.shards(split) if s.samples]
    if not shards:
        raise LauncherError(f"split {split!r} in {index.folder} has no samples")
    return shards




@dataclass(frozen=True)
class LanguageSet:
    """One shard set of a run, resolved: its index, the Whisper code of its language, its weight (None: not
    given)."""

    index: ShardIndex
    language: str
    weight: float | None = None


def shares(sizes: Sequence[int], weights: Sequence[float | None], temperature: float | None) -> list[float]:
    """Each set's share of an epoch (see the module docstring); they sum to 1."""
    if temperature is not None:
        raw = [n ** (1.0 / temperature) for n in sizes]
    elif all(w is not None for w in weights):
        raw = [float(w) for w in weights]
    else:
        raw = [float(n) for n in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def quotas(probabilities: Sequence[float], total: int) -> list[int]:
    """Samples of each set in an epoch of `total`: the largest-remainder rounding of p_s * total, at least one each
    (a set in the recipe is never left out)."""
    if total < len(probabilities):
        raise LauncherError(f"{total} training samples cannot hold one of each of {len(probabilities)} shard sets")
    exact = [p * total for p in probabilities]
    out = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(out)), key=lambda s: (-(exact[s] - int(exact[s])), s))
    i = 0
    while sum(out) < total:
        out[by_remainder[i % len(out)]] += 1
        i += 1
    while sum(out) > total:  # only when the minimum of one lifted a set: take from the largest
        out[max(range(len(out)), key=lambda s: out[s])] -= 1
    return out


@dataclass(frozen=True)
class Read:
    """Samples of one shard that a worker reads for an epoch: their in-shard positions (sorted) and their
    positions in the epoch's sequence."""

    set: int
    shard: Shard
    wanted: np.ndarray
    positions: np.ndarray


class Mix:
    """The training split of K shard sets as one sequence per epoch (the module docstring)."""

    def __init__(self, sets: Sequence[list[Shard]], probabilities: Sequence[float], *, seed: int, shuffle: bool):
        self.sets = [list(s) for s in sets]
        self.sizes = [sum(s.samples for s in shards) for shards in self.sets]
        if any(n == 0 for n in self.sizes):
            raise LauncherError("a shard set has no training samples")
        self.seed, self.shuffle = seed, shuffle
        self.total = sum(self.sizes)
        self.quotas = quotas(probabilities, self.total)
        keys = np.concatenate([(np.arange(q) + 0.5) / q for q in self.quotas])
        which = np.concatenate([np.full(q, s, dtype=np.int16) for s, q in enumerate(self.quotas)])
        index = np.concatenate([np.arange(q, dtype=np.int64) for q in self.quotas])
        order = np.argsort(keys, kind="stable")  # stable: a tie keeps the lower set first
        self.set_of, self.index_in_set = which[order], index[order]
        self._orders: dict[tuple[int, int], tuple[list[Shard], np.ndarray]] = {}

    @classmethod
    def of(cls, sets: Sequence[LanguageSet], split: str, temperature: float | None, *, seed: int,
           shuffle: bool) -> Mix:
        """The mix of a run's sets (`recipe.check_against_data_and_model`) on its training split."""
        parts = [train_shards(s.index, split) for s in sets]
        sizes = [sum(sh.samples for sh in part) for part in parts]
        return cls(parts, shares(sizes, [s.weight for s in sets], temperature), seed=seed, shuffle=shuffle)

    def describe(self, languages: Sequence[str]) -> str:
        """One line: each language's samples in an epoch, its share, and how much of a pass over it that is."""
        return f"each epoch of {self.total:,} samples holds " + ", ".join(
            f"{lang} {q:,} ({100 * q / self.total:.1f}%, {q / n:.2f} of a pass)"
            for lang, q, n in zip(languages, self.quotas, self.sizes, strict=True))

    def pass_order(self, s: int, p: int) -> tuple[list[Shard], np.ndarray]:
        """Set s's shards in pass p's order, and where each one's samples start in the pass."""
        if (s, p) not in self._orders:
            order = list(self.sets[s])
            if self.shuffle:  # set 0 keeps the seed a single-set run always used
                random.Random(f"{self.seed}:{p}" if s == 0 else f"{self.seed}:set{s}:{p}").shuffle(order)
            starts = np.cumsum([0] + [sh.samples for sh in order])
            if len(self._orders) > 64:
                self._orders.clear()
            self._orders[(s, p)] = (order, starts)
        return self._orders[(s, p)]

    def reads(self, epoch: int, positions: Sequence[int]) -> list[list[Read]]:
        """For sorted positions of epoch `epoch`'s sequence: per set, the shards to read in order (each a run of
        in-shard positions, increasing), with the epoch positions they fill."""
        positions = np.asarray(positions, dtype=np.int64)
        out: list[list[Read]] = [[] for _ in self.sets]
        which, index = self.set_of[positions], self.index_in_set[positions]
        for s, n in enumerate(self.sizes):
            mine = which == s
            g = epoch * self.quotas[s] + index[mine]  # in the set's endless sequence of passes
            passes, in_pass, pos = g // n, g % n, positions[mine]
            for p in np.unique(passes):
                order, starts = self.pass_order(s, int(p))
                sel = passes == p
                k, at = in_pass[sel], pos[sel]
                shard_no = np.searchsorted(starts, k, side="right") - 1
                cuts = np.flatnonzero(np.diff(shard_no)) + 1
                for lo, hi in zip([0, *cuts], [*cuts, len(k)], strict=True):
                    i = shard_no[lo]
                    out[s].append(Read(s, order[i], k[lo:hi] - starts[i], at[lo:hi]))
        return out
