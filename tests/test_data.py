"""The streaming loader: every sample once per epoch over ranks and workers, endless streams, exact skip."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperTokenizerFast

from launcher.data.labels import LabelEncoder
from launcher.data.loader import collate, train_loader
from launcher.data.mixing import train_shards
from launcher.data.plan import TrainedPositions, loader_state, resume_position
from launcher.data.stream import ShardStream, StreamSettings
from launcher.distributed import contiguous_range
from launcher.features import pad_batch, pad_features
from launcher.shards.format import Shard, load_index
from launcher.shards.reader import BadShard, read_samples


def split_shards(folder: Path, split: str) -> list[Shard]:
    return train_shards(load_index(folder), split)


@pytest.fixture(scope="module")
def targets(tiny_model) -> LabelEncoder:
    return LabelEncoder(WhisperTokenizerFast.from_pretrained(tiny_model), "fr", "transcribe", normalize=False)


def all_ids(shards) -> list[str]:
    return [json.loads(sample.meta)["id"] for s in shards for sample in read_samples(s.path, range(s.samples))]


def stream(shards, targets, rank, world, batch=2, plan=None, skip_batches=0, **settings) -> ShardStream:
    return ShardStream(shards, targets, StreamSettings(seed=7, shuffle=True, shuffle_buffer=5, batch_size=batch,
                                                       **settings), rank=rank, world_size=world, plan=plan,
                       skip_batches=skip_batches)


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 2), (5, 3)])
def test_every_sample_is_seen_once_per_epoch_across_ranks_and_workers(demo_shards, targets, world, workers):
    shards = split_shards(demo_shards["shards"], "train")
    ids = all_ids(shards)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            s = stream(shards, targets, rank, world)
            for worker in range(workers):
                n = sum(len(r.wanted) for reads in s.epoch_items(epoch, worker, workers) for r in reads)
                gen = s.samples(worker, workers)
                taken = [next(gen) for _ in range(n * (epoch + 1))][n * epoch:]
                assert {t["epoch"] for t in taken} == {epoch}
                seen += [i for t in taken for i in t["ids"]]
        assert Counter(seen) == Counter(ids), f"epoch {epoch}"


def test_rank_ranges_differ_by_at_most_one_sample():
    sizes = [b - a for a, b in (contiguous_range(44, 6, r) for r in range(6))]
    assert sum(sizes) == 44 and max(sizes) - min(sizes) <= 1
    assert contiguous_range(44, 6, 0)[0] == 0 and contiguous_range(44, 6, 5)[1] == 44


def test_streams_never_run_dry_so_uneven_shards_give_equal_steps(demo_shards, targets):
    shards = split_shards(demo_shards["shards"], "train")  # several shards of unequal sizes
    for rank in range(3):
        loader = train_loader(stream(shards[:2], targets, rank, 3, batch=4), num_workers=0)
        batches = [b for _, b in zip(range(40), loader, strict=False)]
        assert len(batches) == 40 and all(len(b["ids"]) == 4 for b in batches)
        assert batches[-1]["epoch"] > 3


@pytest.mark.parametrize("skip", [4, 5])
def test_skip_batches_resumes_exactly_where_the_run_stopped(demo_shards, targets, skip):
    shards = split_shards(demo_shards["shards"], "train")
    full = [b["ids"] for _, b in zip(range(skip + 5), train_loader(stream(shards, targets, 1, 2), num_workers=2),
                                      strict=False)]
    resumed = [b["ids"] for _, b in zip(range(5), train_loader(stream(shards, targets, 1, 2, skip_batches=skip),
                                                               num_workers=2), strict=False)]
    assert resumed == full[skip:]


def rank_batches(s: ShardStream, workers: int):
    """A rank's batches as DataLoader delivers them: whole batches from its workers in turn."""
    gens = [s.worker_stream(w, workers) for w in range(workers)]
    for i in itertools.count():
        yield collate([next(gens[i % workers]) for _ in range(s.batch_size)])


def run_ranks(streams: list[ShardStream], workers: int, batches: int, seen: list) -> list[dict]:
    """Take `batches` batches on every rank, recording (epoch, id); returns each rank's loader state."""
    states = []
    for s in streams:
        consumed = TrainedPositions(workers, s.plan.start_epoch)
        for _, batch in zip(range(batches), rank_batches(s, workers), strict=False):
            consumed.update(batch)
            seen += zip(batch["epochs"], batch["ids"], strict=True)
        states.append(loader_state(s.plan, consumed, world_size=len(streams), rank=s.rank, workers=workers))
    return states


@pytest.mark.parametrize("before, after", [((2, 2), (1, 1)), ((2, 2), (3, 2)), ((2, 1), (2, 3)), ((3, 2), (2, 2))],
                         ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("batches_before", [3, 9, 13])
def test_a_resume_on_other_ranks_or_workers_repeats_and_skips_no_sample(demo_shards, targets, before, after,
                                                                        batches_before):
    """Ranks x workers before and after; stopped mid-epoch (3, 9 batches) or with workers in two epochs (13)."""
    shards = split_shards(demo_shards["shards"], "train")
    ids, total = all_ids(shards), sum(s.samples for s in shards)
    seen: list = []
    states = run_ranks([stream(shards, targets, r, before[0]) for r in range(before[0])], before[1], batches_before,
                       seen)
    open_epochs = {e for e, _ in seen}
    streams = []
    for rank in range(after[0]):
        plan, consumed, skip = resume_position(states, total, world_size=after[0], rank=rank, workers=after[1],
                                               batches=batches_before)
        assert skip == 0 and consumed.epochs == [plan.start_epoch] * after[1]
        streams.append(stream(shards, targets, rank, after[0], plan=plan))
    run_ranks(streams, after[1], 3 * total // (2 * after[0]), seen)
    for epoch in range(max(open_epochs) + 2):  # the epochs cut by the stop, and the first one planned afresh
        assert Counter(i for e, i in seen if e == epoch) == Counter(ids), f"epoch {epoch}"


def test_a_resume_on_the_same_ranks_and_workers_replays_the_plan(demo_shards, targets):
    shards = split_shards(demo_shards["shards"], "train")
    total = sum(s.samples for s in shards)
    states = run_ranks([stream(shards, targets, r, 2) for r in range(2)], 2, 7, [])
    plan, consumed, skip = resume_position(states, total, world_size=2, rank=1, workers=2, batches=7)
    assert skip == 7 and plan.start_epoch == 0 and not plan.excluded
    assert [p.tolist() for p in (w["positions"] for w in consumed.state())] == \
           [w["positions"].tolist() for w in states[1]["consumed"]]


def test_a_replanned_run_resumes_exactly_on_the_same_ranks_again(demo_shards, targets):
    """2x2 -> 1x2 after 9 batches, 5 batches on, stopped again: the next resume replays the new plan exactly."""
    shards = split_shards(demo_shards["shards"], "train")
    total = sum(s.samples for s in shards)
    states = run_ranks([stream(shards, targets, r, 2) for r in range(2)], 2, 9, [])
    plan, _, _ = resume_position(states, total, world_size=1, rank=0, workers=2, batches=9)
    uninterrupted = [b["ids"] for _, b in zip(range(12), rank_batches(stream(shards, targets, 0, 1, plan=plan), 2),
                                               strict=False)]
    states = run_ranks([stream(shards, targets, 0, 1, plan=plan)], 2, 5, [])
    plan2, _, skip = resume_position(states, total, world_size=1, rank=0, workers=2, batches=9 + 5)
    assert skip == 5 and plan2.start_epoch == plan.start_epoch
    assert all(np.array_equal(plan2.excluded[e], plan.excluded[e]) for e in plan.excluded)
    resumed = [b["ids"] for _, b in zip(range(7), rank_batches(stream(shards, targets, 0, 1, plan=plan2,
                                                                      skip_batches=skip), 2), strict=False)]
    assert resumed == uninterrupted[5:]


def test_a_sample_missing_a_part_is_reported_not_silently_lost(tmp_path):
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.mel.npy", "a.json", "b.json", "c.mel.npy", "c.json"):  # b has no features
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    got = []
    with pytest.raises(BadShard, match="gave 2 of the 3 samples") as e:
        for sample in read_samples(shard, range(3)):
            got.append(sample.key)
    assert got == ["a", "c"] and e.value.skipped == 1


def test_collate_ships_stored_float16_frames_padded_to_the_window_on_the_device(demo_shards, targets):
    """The batch carries float16 frames up to the longest clip (not 3000 float32 frames: 12 MB per large-v3 batch
    through /dev/shm); pad_batch then gives exactly what pad_features (the feature extractor's padding) gives."""
    shards = split_shards(demo_shards["shards"], "train")
    samples = [x for _, x in zip(range(3), stream(shards, targets, 0, 1).samples(0, 1), strict=False)]
    batch = collate(samples)
    longest = max(s["features"].shape[-1] for s in samples)
    assert batch["features"].dtype == torch.float16 and batch["features"].shape == (3, 80, longest) < (3, 80, 3000)
    assert batch["frames"].tolist() == [s["features"].shape[-1] for s in samples]
    padded = pad_batch(batch["features"], batch["frames"], batch["pads"], torch.float32)
    assert padded.shape == (3, 80, 3000)
    for i, s in enumerate(samples):
        assert torch.equal(padded[i], pad_features(s["features"])), i
    bf16 = pad_batch(batch["features"], batch["frames"], batch["pads"], torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, padded.to(torch.bfloat16))


def test_labels_are_padded_with_minus_100_to_buckets_of_32_tokens(demo_shards, targets):
    shards = split_shards(demo_shards["shards"], "train")
    samples = [x for _, x in zip(range(3), stream(shards, targets, 0, 1).samples(0, 1), strict=False)]
    batch = collate(samples)
    longest = max(len(s["labels"]) for s in samples)
    assert batch["labels"].shape == (3, 32 * -(-longest // 32))
    for i, s in enumerate(samples):
        assert batch["labels"][i, : len(s["labels"])].tolist() == s["labels"]
        assert (batch["labels"][i, len(s["labels"]):] == -100).all()
    long = [{**samples[0], "labels": list(range(447))}]
    assert collate(long)["labels"].shape == (1, 448), "never more than Whisper's 448 decoder positions"


def test_labels_start_after_startoftranscript_and_end_with_eot(targets):
    tok = targets.tokenizer
    ids = targets("Bonjour à tous.")
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<|fr|>", "<|transcribe|>", "<|notimestamps|>"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "Bonjour à tous."


def test_over_long_labels_are_dropped_and_counted_never_truncated(tmp_path, targets):
    shard = tmp_path / "train-000000.tar"
    texts = ["court", " ".join(["mot"] * 600), "encore court"]
    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(texts):
            for name, data in ((f"s{i}.mel.npy", _npy(np.zeros((80, 10), np.float16))),
                               (f"s{i}.json", json.dumps({"id": f"s{i}", "text": text}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s = ShardStream([Shard(shard, 3)], targets, StreamSettings(seed=0, shuffle=False, shuffle_buffer=1, batch_size=1),
                    rank=0, world_size=1)
    got = [x for _, x in zip(range(4), s.samples(0, 1), strict=False)]
    assert [g["ids"] for g in got] == [["s0"], ["s2"], ["s0"], ["s2"]]
    assert [g["dropped_long"] for g in got] == [0, 1, 0, 1]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_missing_split_is_a_clear_error(demo_shards):
    from launcher.errors import LauncherError

    with pytest.raises(LauncherError, match="no split 'dev'"):
        split_shards(Path(demo_shards["shards"]), "dev")
