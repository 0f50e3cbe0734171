"""Streaming training data from shards: every sample once per epoch, the same number of steps on every rank.

The plan, per epoch e (all of it follows from the seed, so every rank computes it alone, without talking):

1. the split's shards are put in a seeded order for epoch e; their samples, in that order, form the
   epoch's global sequence of N samples (the counts come from index.json, nothing is read to plan);
2. the sequence is cut into one contiguous range per rank (sizes differ by at most one) and each rank's
   range into one contiguous range per loader worker, so a worker reads only the shards its range covers;
3. a worker reads its range in blocks of `shuffle_buffer` samples and yields each block in a seeded order.

Each worker's stream runs on into the next epoch, so no rank ever runs dry: a run lasts `max_steps` optimizer
steps on every rank (never "until the data ends", which hangs DeepSpeed when ranks hold unequal data), and
within each epoch every sample is seen exactly once. A position is just the number of batches consumed:
resuming replays the plan and skips that many batches without decoding them.
"""

from __future__ import annotations

import io
import json
import random
import signal
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.errors import LauncherError
from launcher.features import pad_features
from launcher.index import load_index
from launcher.text import normalize_target

MAX_LABEL_TOKENS = 448  # Whisper's decoder has 448 positions


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int
    sha256: str | None = None


def split_shards(shards_dir: Path, split: str) -> list[Shard]:
    index = load_index(shards_dir)
    if split not in index["splits"]:
        raise LauncherError(f"{shards_dir}/index.json has no split {split!r} (it has: {', '.join(index['splits'])})")
    shards = [Shard(Path(shards_dir) / s["path"], s["samples"], s.get("sha256"))
              for s in index["splits"][split]["shards"]]
    if not any(s.samples for s in shards):
        raise LauncherError(f"split {split!r} in {shards_dir} has no samples")
    return [s for s in shards if s.samples]


def contiguous_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of `part` when `total` items are cut into `parts` ranges whose sizes differ by at most 1."""
    base, extra = divmod(total, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def epoch_shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


class BadData(Exception):
    """A shard or sample that cannot be trained on; `skipped` samples are lost with it."""

    def __init__(self, message: str, skipped: int):
        super().__init__(message)
        self.skipped = skipped


def read_samples(shard: Path, skip: int, take: int) -> Iterator[tuple[str, bytes, bytes]]:
    """(key, mel.npy bytes, json bytes) of samples [skip, skip + take) of a shard, seeking over the skipped.
    A truncated or corrupt tar raises BadData naming the shard and the last good key."""
    position, key, parts, delivered = 0, None, {}, 0
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                k, _, ext = member.name.partition(".")
                if k != key:
                    if key is not None:
                        position += 1
                    key, parts = k, {}
                    if position >= skip + take:
                        return
                if position < skip or ext not in ("mel.npy", "json"):
                    continue
                parts[ext] = tar.extractfile(member).read()
                if len(parts) == 2:
                    delivered += 1
                    yield key, parts["mel.npy"], parts["json"]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadData(f"shard {shard} is unreadable after key {key!r}: {type(e).__name__}: {e}",
                      skipped=take - delivered) from None
    if delivered < take:
        raise BadData(f"shard {shard} ends after {delivered} of the {take} samples index.json promises here "
                      f"(last key {key!r})", skipped=take - delivered)


def verify_sha256(shard: Shard) -> None:
    from launcher.index import sha256_file

    if shard.sha256 and sha256_file(shard.path) != shard.sha256:
        raise BadData(f"shard {shard.path} does not match its sha256 in index.json", skipped=shard.samples)


class Targets:
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


class ShardStream(IterableDataset):
    """One rank's endless stream of training samples; see the module docstring for the plan."""

    def __init__(self, shards: list[Shard], targets: Targets, *, rank: int, world_size: int, seed: int,
                 shuffle: bool, shuffle_buffer: int, batch_size: int, skip_batches: int = 0, verify: bool = False,
                 on_bad_data: str = "skip"):
        self.shards, self.targets = shards, targets
        self.verify, self.on_bad_data = verify, on_bad_data
        self._checked: dict[Path, BadData | None] = {}  # sha256 verdicts, per worker process
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.buffer, self.batch_size = shuffle, max(1, shuffle_buffer), batch_size
        self.total = sum(s.samples for s in shards)
        self.skip_batches = skip_batches
        if self.total < world_size:
            raise LauncherError(f"{self.total} training samples cannot feed {world_size} ranks")

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _skip_samples(self, worker: int, workers: int, batches: int | None = None) -> int:
        """Samples this worker delivered in the first `batches` (default: skip_batches) batches of the rank
        (DataLoader takes whole batches from workers in turn: batch i comes from worker i % workers)."""
        return len(range(worker, self.skip_batches if batches is None else batches, workers)) * self.batch_size

    def position(self, batches: int, workers: int) -> dict:
        """Where every worker of this rank stands after `batches` batches (what a resume skips)."""
        return {"batches": batches, "rank": self.rank, "world_size": self.world_size,
                "workers": [{"worker": w, "delivered_samples": self._skip_samples(w, max(workers, 1), batches)}
                            for w in range(max(workers, 1))]}

    def _bad(self, error: BadData, worker: int) -> int:
        """Report bad data by shard and key; stop the run or skip it, per the recipe. Returns samples lost."""
        if self.on_bad_data == "stop":
            raise LauncherError(f"{error} (data.on_bad_data: stop)")
        print(f"warning: rank {self.rank} worker {worker}: skipped {error.skipped} sample(s): {error}",
              file=sys.stderr, flush=True)
        return error.skipped

    def _check(self, shard: Shard) -> None:
        """sha256 against index.json, hashed once per worker; a bad shard stays bad for every later epoch."""
        if shard.path not in self._checked:
            try:
                verify_sha256(shard)
                self._checked[shard.path] = None
            except BadData as e:
                self._checked[shard.path] = e
        if self._checked[shard.path] is not None:
            raise self._checked[shard.path]

    def epoch_items(self, epoch: int, worker: int, workers: int) -> Iterator[tuple[Shard, int, int]]:
        """(shard, skip, take) pieces of this worker's range of the epoch's global sequence, in order."""
        lo, hi = contiguous_range(self.total, self.world_size, self.rank)
        w_lo, w_hi = contiguous_range(hi - lo, workers, worker)
        start, stop = lo + w_lo, lo + w_hi
        offset = 0
        for shard in epoch_shard_order(self.shards, self.seed, epoch, self.shuffle):
            a, b = max(start, offset), min(stop, offset + shard.samples)
            if a < b:
                yield shard, a - offset, b - a
            offset += shard.samples

    def _blocks(self, epoch: int, worker: int, workers: int, bad: list[int]) -> Iterator[list[tuple]]:
        """This worker's samples of one epoch in blocks of `shuffle_buffer`; bad data is counted into `bad`."""
        block: list = []
        for shard, skip, take in self.epoch_items(epoch, worker, workers):
            try:
                if self.verify:
                    self._check(shard)
            except BadData as e:
                bad[0] += self._bad(BadData(str(e), skipped=take), worker)
                continue
            try:
                for sample in read_samples(shard.path, skip, take):
                    block.append((shard.path.name, *sample))
                    if len(block) == self.buffer:
                        yield block
                        block = []
            except BadData as e:
                bad[0] += self._bad(e, worker)
        if block:
            yield block

    def samples(self, worker: int, workers: int) -> Iterator[dict]:
        """This worker's endless stream: epochs one after another, each block in a seeded order. Samples whose
        labels do not fit, and bad data, are left out and counted in the next sample's `dropped_long` and
        `bad_data`."""
        to_skip = self._skip_samples(worker, workers)
        epoch, dropped, bad = 0, 0, [0]
        while True:
            produced = 0
            for block_no, block in enumerate(self._blocks(epoch, worker, workers, bad)):
                if self.shuffle:
                    random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}:{block_no}").shuffle(block)
                for shard_name, key, mel, meta in block:
                    try:
                        meta = json.loads(meta)
                        labels = self.targets(meta["text"])
                    except (ValueError, KeyError, TypeError) as e:
                        bad[0] += self._bad(BadData(f"sample {key!r} of shard {shard_name}: bad json ({e})", 1), worker)
                        continue
                    if labels is None:
                        dropped += 1
                        continue
                    produced += 1
                    if to_skip:  # delivered before the checkpoint, drops included: count nothing twice
                        to_skip, dropped, bad[0] = to_skip - 1, 0, 0
                        continue
                    try:
                        features = torch.from_numpy(np.load(io.BytesIO(mel), allow_pickle=False))
                    except (ValueError, OSError, EOFError) as e:
                        bad[0] += self._bad(BadData(f"sample {key!r} of shard {shard_name}: unreadable features "
                                                    f"({e})", 1), worker)
                        continue
                    yield {"id": meta["id"], "features": features, "labels": labels, "epoch": epoch,
                           "dropped_long": dropped, "bad_data": bad[0]}
                    dropped, bad[0] = 0, 0
            if produced == 0:
                raise LauncherError(f"rank {self.rank} worker {worker}: no usable sample in its part of the data "
                                    "(all unreadable, or labels over 448 tokens)")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        return self.samples(*self._worker())


def collate(samples: list[dict], pad_token_id: int = -100) -> dict:
    """Features padded to Whisper's 3000 frames exactly as WhisperFeatureExtractor pads; labels padded with
    -100 (ignored by the loss)."""
    longest = max(len(s["labels"]) for s in samples)
    labels = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    for i, s in enumerate(samples):
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    return {"input_features": torch.stack([pad_features(s["features"]) for s in samples]), "labels": labels,
            "ids": [s["id"] for s in samples], "epochs": [s["epoch"] for s in samples],
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
