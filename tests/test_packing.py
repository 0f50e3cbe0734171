"""Packing (launcher/packing.py, data.pack): windows of several clips, their labels (launcher/labels.py) and their
features (features.join_features), on the bundled corpus's real shards and audio."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import WhisperTokenizerFast

from launcher import audio
from launcher.data.labels import LabelEncoder, Segment
from launcher.data.loader import collate, train_loader
from launcher.data.mixing import train_shards
from launcher.data.packing import ClipRef, Packer, PackSettings
from launcher.data.plan import TrainedPositions, loader_state, resume_position
from launcher.data.stream import ShardStream, StreamSettings
from launcher.errors import LauncherError
from launcher.features import HOP_LENGTH, join_features, log_mel_spectrogram
from launcher.shards.format import load_index
from launcher.shards.reader import read_samples
from tests.conftest import DEMO

PACK = PackSettings.from_seconds(12.0, 0.2, same_speaker=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return WhisperTokenizerFast.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> LabelEncoder:
    return LabelEncoder(tokenizer, "fr", "transcribe", normalize=False, timestamps=True)


def train_meta(demo_shards) -> dict[str, dict]:
    shards = train_shards(load_index(demo_shards["shards"]), "train")
    return {m["id"]: m for s in shards for m in (json.loads(x.meta) for x in read_samples(s.path, load_mel=False))}


def stream(demo_shards, encoder, rank=0, world=1, pack=PACK, plan=None, skip_batches=0) -> ShardStream:
    shards = train_shards(load_index(demo_shards["shards"]), "train")
    settings = StreamSettings(seed=3, shuffle=True, shuffle_buffer=7, batch_size=2, pack=pack,
                              timestamp_probability=0.5, prompt_probability=0.5)
    return ShardStream(shards, encoder, settings, rank=rank, world_size=world, plan=plan, skip_batches=skip_batches)


def epochs_of(gen, epochs: int) -> list[dict]:
    """The samples of the first `epochs` epochs of a worker's stream."""
    return list(itertools.takewhile(lambda x: x["epoch"] < epochs, gen))


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("same_speaker", [False, True])
def test_windows_hold_each_clip_once_per_epoch_within_30s_and_448_tokens(demo_shards, encoder, world, workers,
                                                                         same_speaker):
    meta = train_meta(demo_shards)
    pack = PackSettings.from_seconds(12.0, 0.2, same_speaker)
    seen: dict[int, list[str]] = {0: [], 1: []}
    sizes = []
    for rank in range(world):
        s = stream(demo_shards, encoder, rank, world, pack)
        for worker in range(workers):
            for x in epochs_of(s.samples(worker, workers), 2):
                seen[x["epoch"]] += x["ids"]
                sizes.append(len(x["ids"]))
                assert x["features"].shape[-1] <= pack.max_frames, x["ids"]
                assert len(x["prompt"]) + len(x["labels"]) + 1 <= 448
                assert {e for e, _ in x["positions"]} == {x["epoch"]}, "a window never spans two epochs"
                assert x["seconds"] == pytest.approx(sum(meta[i]["seconds"] for i in x["ids"]))
                if same_speaker:
                    assert len({meta[i]["speaker"] for i in x["ids"]}) == 1, x["ids"]
    for epoch, ids in seen.items():
        assert Counter(ids) == Counter(meta.keys()), f"epoch {epoch}: every clip exactly once"
    assert max(sizes) >= 2, "windows do hold several clips"
    if not same_speaker:  # one speaker's clips meet in a shuffle block (7 clips here) only now and then
        assert sum(sizes) / len(sizes) > 1.5


def clip(i: int, frames: int, text_len: int, speaker=None) -> ClipRef:
    return ClipRef(f"c{i}", 0, i, tuple(range(text_len)), frames / 100, b"", frames=frames, speaker=speaker)


def test_a_window_closes_before_30s_or_its_labels_would_not_fit(encoder):
    packer = Packer(PackSettings.from_seconds(30.0, 0.5, False), encoder.fits)
    # 10 s clips with a 0.5 s gap: two fit in 30 s (20.5 s), the third would end at 31 s
    windows = [w for c in (clip(i, 1000, 5) for i in range(5)) for w in packer.add(c)] + list(packer.flush())
    assert [[c.id for c in w.clips] for w in windows] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert windows[0].offsets == [0, 1050]
    # 200-token texts: two fit the decoder (2 + 2 x 202 + 1 = 407 labels), three would not
    packer = Packer(PackSettings.from_seconds(30.0, 0.0, False), encoder.fits)
    windows = [w for c in (clip(i, 100, 200) for i in range(3)) for w in packer.add(c)] + list(packer.flush())
    assert [len(w.clips) for w in windows] == [2, 1]
    assert all(encoder.length([len(c.text_ids) for c in w.clips]) + 1 <= 448 for w in windows)
    # a clip longer than the window is a window of its own
    packer = Packer(PackSettings.from_seconds(5.0, 0.0, False), encoder.fits)
    windows = [w for c in (clip(0, 800, 3), clip(1, 100, 3)) for w in packer.add(c)] + list(packer.flush())
    assert [[c.id for c in w.clips] for w in windows] == [["c0"], ["c1"]]


def test_same_speaker_joins_only_one_speakers_clips(encoder):
    packer = Packer(PackSettings.from_seconds(30.0, 0.0, True), encoder.fits)
    clips = [clip(0, 100, 3, "a"), clip(1, 100, 3, "b"), clip(2, 100, 3, "a"), clip(3, 100, 3, None),
             clip(4, 100, 3, None), clip(5, 100, 3, "b")]
    windows = [w for c in clips for w in packer.add(c)] + list(packer.flush())
    assert sorted([c.id for c in w.clips] for w in windows) == [["c0", "c2"], ["c1", "c5"], ["c3"], ["c4"]]


def test_single_probability_closes_that_share_of_windows_around_their_first_clip(encoder):
    """data.pack.single_probability: a window the packer opens holds its first clip alone with that probability (a
    short clip followed by silence, as short-form evaluation presents it), the others are packed as before; the
    draw follows the seed and the clip's place in the plan, never the order windows are asked for."""
    clips = [clip(i, 300, 5) for i in range(600)]

    def windows(p: float, seed: int = 0) -> list[list[str]]:
        packer = Packer(PackSettings.from_seconds(30.0, 0.2, False, p), encoder.fits, seed)
        return [[c.id for c in w.clips] for c in clips for w in packer.add(c)] + \
            [[c.id for c in w.clips] for w in packer.flush()]

    plain = windows(0.0)
    assert windows(0.0, seed=7) == plain and all(len(w) == 9 for w in plain[:-1]), "p=0: packed as before"
    assert all(len(w) == 1 for w in windows(1.0))
    quarter = windows(0.25)
    assert sorted(i for w in quarter for i in w) == sorted(c.id for c in clips), "every clip in exactly one window"
    singles = sum(len(w) == 1 for w in quarter)
    assert 0.15 < singles / len(quarter) < 0.35, (singles, len(quarter))
    assert all(len(w) in (1, 9) for w in quarter[:-1]), "the other windows are filled as before"
    assert windows(0.25) == quarter and windows(0.25, seed=1) != quarter


def test_single_clip_windows_keep_each_clip_once_per_epoch_on_any_ranks(demo_shards, encoder):
    meta = train_meta(demo_shards)
    pack = PackSettings.from_seconds(12.0, 0.2, False, single_probability=0.5)
    by_world = {}
    for world in (1, 2):
        seen, windows = [], []
        for rank in range(world):
            for x in epochs_of(stream(demo_shards, encoder, rank, world, pack).samples(0, 1), 1):
                seen += x["ids"]
                windows.append(x["ids"])
        assert Counter(seen) == Counter(meta.keys())
        by_world[world] = windows
    assert any(len(w) == 1 for w in by_world[1]) and any(len(w) > 1 for w in by_world[1])


def test_timestamped_labels_decode_to_each_clips_text_and_times_with_whispers_own_decoder(encoder, tokenizer):
    texts = ["Bonjour à tous.", "Il fait beau aujourd'hui.", "Merci beaucoup."]
    segments = [Segment(encoder.text_ids(t), start, end) for t, (start, end) in
                zip(texts, [(0.0, 3.217), (3.63, 8.0), (8.42, 11.311)], strict=True)]
    ids = encoder.window(segments, timestamps=True)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<|fr|>", "<|transcribe|>", "<|0.00|>"] and ids[-1] == tokenizer.eos_token_id
    assert "<|notimestamps|>" not in tokens
    # token by token: <|start|> text <|end|> per clip, times to the nearest 0.02 s
    expected = list(encoder.task_tokens)
    for s in segments:
        expected += [tokenizer.convert_tokens_to_ids(f"<|{round(s.start / 0.02) * 0.02:.2f}|>"), *s.text_ids,
                     tokenizer.convert_tokens_to_ids(f"<|{round(s.end / 0.02) * 0.02:.2f}|>")]
    assert ids == [*expected, tokenizer.eos_token_id]
    offsets = tokenizer.decode(ids, output_offsets=True)["offsets"]
    assert [o["text"].strip() for o in offsets] == texts
    assert [o["timestamp"] for o in offsets] == [(0.0, 3.22), (3.64, 8.0), (8.42, 11.32)]
    plain = encoder.window(segments, timestamps=False)
    assert tokenizer.convert_ids_to_tokens(plain[:3]) == ["<|fr|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tokenizer.decode(plain, skip_special_tokens=True).strip() == " ".join(texts)
    assert plain == encoder(" ".join(texts)) or tokenizer.decode(plain) == tokenizer.decode(encoder(" ".join(texts)))


def test_joined_features_equal_the_joined_audios_but_at_the_joins(demo_shards):
    """The window's features are joined from the stored ones; computed from the joined audio instead they differ
    only in the frames whose 25 ms window spans a join (each stored clip saw Whisper's reflection of its own start
    there)."""
    rows = [r.split("\t") for r in (DEMO / "train.tsv").read_text(encoding="utf-8").splitlines()[1:4]]
    clips = [audio.decode_audio((DEMO / "clips" / r[1]).read_bytes()) for r in rows]
    mels = [log_mel_spectrogram(c) for c in clips]
    gap = 20  # frames: 0.2 s
    offsets = [0]
    for m in mels[:-1]:
        offsets.append(offsets[-1] + m.shape[-1] + gap)
    joined_audio = np.zeros(offsets[-1] * HOP_LENGTH + len(clips[-1]), dtype=np.float32)
    for c, o in zip(clips, offsets, strict=True):
        joined_audio[o * HOP_LENGTH: o * HOP_LENGTH + len(c)] = c
    reference = log_mel_spectrogram(joined_audio)
    joined = join_features(mels, offsets)
    assert joined.shape == reference.shape
    diff = np.abs(joined - reference).max(axis=0)
    at_joins = {o + k for o in offsets[1:] for k in range(-2, 3)}
    assert max(diff[t] for t in range(len(diff)) if t not in at_joins) < 1e-4
    assert (diff > 1e-4).sum() <= 3 * (len(offsets) - 1)


def test_prompts_become_decoder_inputs_and_are_not_learned(demo_shards, encoder, tokenizer):
    samples = [x for x in itertools.islice(stream(demo_shards, encoder).samples(0, 1), 12)]
    assert any(x["prompt"] for x in samples) and any(not x["prompt"] for x in samples)
    batch = collate(samples, start_token=encoder.start, pad_token=encoder.eot)
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    for i, x in enumerate(samples):
        k, n = len(x["prompt"]), len(x["labels"])
        assert batch["labels"][i, :k].tolist() == [-100] * k and batch["labels"][i, k:k + n].tolist() == x["labels"]
        assert batch["decoder_input_ids"][i, :k + n].tolist() == [*x["prompt"], start, *x["labels"][:-1]]
        if k:
            assert tokenizer.convert_ids_to_tokens(x["prompt"][0]) == "<|startofprev|>"
    assert batch["windows"] == [x["ids"] for x in samples] and batch["ids"] == [i for x in samples for i in x["ids"]]
    assert batch["features"].dtype == torch.float16


@pytest.mark.parametrize("skip", [3, 4])
def test_a_packed_stream_resumes_exactly_where_it_stopped(demo_shards, encoder, skip):
    full = [(b["windows"], b["labels"].tolist(), b["features"]) for b in
            itertools.islice(train_loader(stream(demo_shards, encoder, 1, 2), num_workers=2), skip + 4)]
    resumed = [(b["windows"], b["labels"].tolist(), b["features"]) for b in
               itertools.islice(train_loader(stream(demo_shards, encoder, 1, 2, skip_batches=skip), num_workers=2), 4)]
    for (w1, l1, f1), (w2, l2, f2) in zip(full[skip:], resumed, strict=True):
        assert w1 == w2 and l1 == l2 and torch.equal(f1, f2)


def test_a_packed_run_resumed_on_other_ranks_repeats_and_skips_no_clip(demo_shards, encoder):
    meta = train_meta(demo_shards)
    total = len(meta)
    seen, states = [], []
    for rank in range(2):  # 2 ranks x 2 workers, 3 batches each: mid-epoch
        s = stream(demo_shards, encoder, rank, 2)
        consumed = TrainedPositions(2, 0)
        gens = [s.worker_stream(w, 2) for w in range(2)]
        for i in range(3):
            batch = collate([next(gens[i % 2]) for _ in range(2)], start_token=encoder.start, pad_token=encoder.eot)
            consumed.update(batch)
            seen += zip(batch["epochs"], batch["ids"], strict=True)
        states.append(loader_state(s.plan, consumed, world_size=2, rank=rank, workers=2))
    plan, consumed, skip = resume_position(states, total, world_size=1, rank=0, workers=1, batches=3)
    for x in epochs_of(stream(demo_shards, encoder, 0, 1, plan=plan).samples(0, 1), 2):
        seen += [(x["epoch"], i) for i in x["ids"]]
    for epoch in (0, 1):
        assert Counter(i for e, i in seen if e == epoch) == Counter(meta.keys()), f"epoch {epoch}"


def test_timestamped_labels_need_a_model_with_timestamp_ids(tokenizer):
    begin = tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
    LabelEncoder(tokenizer, "fr", "transcribe", normalize=False, timestamps=True, vocab_size=begin + 1501)
    with pytest.raises(LauncherError, match="no timestamp tokens"):
        LabelEncoder(tokenizer, "fr", "transcribe", normalize=False, timestamps=True, vocab_size=begin + 10)
