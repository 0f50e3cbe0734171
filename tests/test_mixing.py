"""Several shard sets in one run: the mix's shares and passes, per-sample language tokens, an unlearned language
token, resume with two sets, and the recipe's checks of each set."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import WhisperTokenizerFast

from launcher.data.labels import LabelEncoder
from launcher.data.loader import collate
from launcher.data.mixing import Mix, quotas, shares, train_shards
from launcher.data.packing import PackSettings
from launcher.data.plan import resume_position
from launcher.data.stream import ShardStream, StreamSettings
from launcher.errors import LauncherError
from launcher.model import input_frames
from launcher.recipe.checks import check_against_data_and_model
from launcher.recipe.load import load_recipe
from launcher.shards.format import Shard, load_index
from tests.conftest import REPO
from tests.test_data import rank_batches, run_ranks


def fake_sets(sizes_per_set: list[list[int]]) -> list[list[Shard]]:
    return [[Shard(Path(f"/nowhere/set{s}/{i}.tar"), n) for i, n in enumerate(sizes)]
            for s, sizes in enumerate(sizes_per_set)]


def covered(mix: Mix, epoch: int, world: int = 1, workers: int = 1) -> list[tuple[int, Shard, int, int]]:
    """(set, shard, in-shard position, epoch position) of every sample of an epoch, over ranks and workers."""
    from launcher.data.plan import DataPlan, worker_positions

    out = []
    for rank in range(world):
        for worker in range(workers):
            positions = worker_positions(DataPlan(), mix.total, epoch, world, rank, workers, worker)
            for reads in mix.reads(epoch, positions):
                for r in reads:
                    out += [(r.set, r.shard, int(k), int(p)) for k, p in zip(r.wanted, r.positions, strict=True)]
    return out


def test_shares_follow_weights_temperature_or_sizes():
    assert shares([100, 300], [1.0, 3.0], None) == [0.25, 0.75]
    assert shares([100, 400], [None, None], None) == [0.2, 0.8]
    t2 = shares([100, 400], [None, None], 2.0)  # sqrt: 10 and 20
    assert t2 == pytest.approx([1 / 3, 2 / 3])
    assert quotas([0.001, 0.999], 100) == [1, 99], "a set is never left out"
    assert sum(quotas([0.3, 0.3, 0.4], 1001)) == 1001


@pytest.mark.parametrize("weights", [[1.0, 1.0, 2.0], [5.0, 1.0, 1.0]])
def test_the_mix_holds_each_sets_share_and_every_sample_once_per_pass(weights):
    """Sets of 1000, 300 and 50 samples in uneven shards; 3 ranks x 2 workers; 12 epochs. The small set is
    upsampled (several passes an epoch), the large one spread over epochs."""
    sets = fake_sets([[400, 350, 250], [7, 93, 200], [50]])
    probabilities = shares([1000, 300, 50], weights, None)
    mix = Mix(sets, probabilities, seed=5, shuffle=True)
    assert mix.total == 1350
    sequence: dict[int, list] = {0: [], 1: [], 2: []}  # each set's samples in the order of its endless sequence
    for epoch in range(12):
        samples = covered(mix, epoch, world=3, workers=2)
        assert sorted(p for *_, p in samples) == list(range(mix.total)), "every position once"
        counts = Counter(s for s, *_ in samples)
        assert [counts[s] for s in range(3)] == mix.quotas
        # any stretch of the sequence (what one rank reads) holds each set in its share, within 2 samples
        by_position = sorted(samples, key=lambda x: x[3])
        for start in range(0, mix.total - 200, 150):
            window = Counter(s for s, *_ in by_position[start:start + 200])
            for s in range(3):
                assert abs(window[s] - 200 * mix.quotas[s] / mix.total) <= 2
        # a set's samples come in its own sequence order along the epoch
        for s in range(3):
            sequence[s] += [(shard.path, k) for x, shard, k, _ in by_position if x == s]
    assert mix.quotas == quotas(probabilities, 1350)
    for s, n in enumerate(mix.sizes):
        seq = sequence[s]
        passes = [seq[i:i + n] for i in range(0, len(seq) - n + 1, n)]
        assert len(passes) >= 2
        for p in passes:
            assert len(set(p)) == n, f"set {s}: a pass holds each sample once"
        if len(sets[s]) > 1:  # shards are ordered per pass (samples are shuffled later, in the stream's buffer)
            assert passes[0] != passes[1], "each pass in its own shard order"


def test_one_set_is_the_single_set_plan_of_before():
    """The epoch's sequence of one set: its shards in the order random.Random(f"{seed}:{epoch}") gives them."""
    [shards] = fake_sets([[5, 9, 3, 7]])
    mix = Mix([shards], [1.0], seed=11, shuffle=True)
    for epoch in range(3):
        order = list(shards)
        random.Random(f"11:{epoch}").shuffle(order)
        expected = [(sh, k) for sh in order for k in range(sh.samples)]
        got = sorted(covered(mix, epoch, world=2, workers=2), key=lambda x: x[3])
        assert [(sh, k) for _, sh, k, _ in got] == expected


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return WhisperTokenizerFast.from_pretrained(tiny_model)


def two_sets(demo_shards) -> Mix:
    parts = [train_shards(load_index(demo_shards[k]), "train") for k in ("shards", "shards_es")]
    return Mix(parts, shares([44, 20], [1.0, 1.0], None), seed=3, shuffle=True)


def mixed_stream(demo_shards, tokenizer, rank=0, world=1, plan=None, skip_batches=0, **settings) -> ShardStream:
    labels = LabelEncoder(tokenizer, "fr", "transcribe", normalize=False, timestamps=True)
    return ShardStream(two_sets(demo_shards), labels, StreamSettings(seed=3, shuffle=True, shuffle_buffer=7,
                                                                     batch_size=2, **settings),
                       rank=rank, world_size=world, plan=plan, skip_batches=skip_batches, languages=["fr", "es"])


@pytest.mark.parametrize("packed", [False, True], ids=["clips", "packed"])
def test_each_sample_starts_with_its_own_sets_language_token(demo_shards, tokenizer, packed):
    ids = {tokenizer.convert_tokens_to_ids(f"<|{lang}|>"): lang for lang in ("fr", "es")}
    pack = PackSettings.from_seconds(10.0, 0.2, False) if packed else None
    s = mixed_stream(demo_shards, tokenizer, pack=pack, timestamp_probability=0.5)
    gen = s.samples(0, 1)
    languages = Counter()
    for _ in range(60):
        sample = next(gen)
        clip_languages = {i.split("_")[2] for i in sample["ids"]}  # common_voice_<lang>_<n>
        assert len(clip_languages) == 1, "a window holds one language"
        assert ids[sample["labels"][0]] == clip_languages.pop()
        languages[ids[sample["labels"][0]]] += 1
        if packed and len(sample["ids"]) > 1:
            languages["joined"] += 1
    assert languages["fr"] and languages["es"] and (languages["joined"] or not packed)


def test_an_unlearned_language_token_is_read_but_not_a_target(demo_shards, tokenizer, tiny_model):
    """model.train_language_token false: the decoder reads the same inputs as with the token learnt (the model's own
    shift of the labels), and only the language position's target is -100."""
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    s = mixed_stream(demo_shards, tokenizer)
    gen = s.samples(0, 1)
    samples = [next(gen) for _ in range(4)]
    learnt = collate(samples, start_token=s.labels.start, pad_token=s.labels.eot)
    masked = collate(samples, start_token=s.labels.start, pad_token=s.labels.eot, learn_language=False)
    assert "decoder_input_ids" not in learnt
    assert torch.equal(masked["decoder_input_ids"], shift_tokens_right(learnt["labels"], s.labels.eot, s.labels.start))
    assert (masked["labels"][:, 0] == -100).all() and torch.equal(masked["labels"][:, 1:], learnt["labels"][:, 1:])
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    features = torch.randn(4, 80, input_frames(model.config))
    a = model(input_features=features, labels=learnt["labels"]).logits
    b = model(input_features=features, labels=masked["labels"], decoder_input_ids=masked["decoder_input_ids"]).logits
    assert torch.equal(a, b)


def test_two_sets_resume_on_other_ranks_with_no_sample_repeated_or_skipped(demo_shards, tokenizer):
    """2 ranks x 2 workers stop after 9 batches; 1 rank x 1 worker goes on. Each set is seen once per pass: with
    equal weights, French (44) in 32 of each 64-sample epoch, Spanish (20) upsampled to 32."""
    mix = two_sets(demo_shards)
    assert mix.quotas == [32, 32]
    seen: list = []
    states = run_ranks([mixed_stream(demo_shards, tokenizer, r, 2) for r in range(2)], 2, 9, seen)
    streams = []
    plan, _, skip = resume_position(states, mix.total, world_size=1, rank=0, workers=1, batches=9)
    assert skip == 0
    streams.append(mixed_stream(demo_shards, tokenizer, 0, 1, plan=plan))
    run_ranks(streams, 1, 80, seen)
    # 9 batches x 2 samples x 2 workers x 2 ranks + 80 x 2 = 232 samples: the first 3 epochs (192) complete
    per_epoch = Counter(e for e, _ in seen)
    assert all(per_epoch[e] == 64 for e in range(3))
    for lang, quota, n in (("fr", 32, 44), ("es", 32, 20)):
        ids = [i for e, i in seen if e < 3 and f"_{lang}_" in i]
        assert len(ids) == 3 * quota
        counts = Counter(ids)
        assert len(counts) == n and max(counts.values()) - min(counts.values()) <= 1, f"{lang}: once per pass"


def test_two_sets_resume_exactly_on_the_same_ranks(demo_shards, tokenizer):
    full = [b["ids"] for _, b in zip(range(14), rank_batches(mixed_stream(demo_shards, tokenizer, 1, 2), 2),
                                     strict=False)]
    resumed = [b["ids"] for _, b in zip(range(5), rank_batches(mixed_stream(demo_shards, tokenizer, 1, 2,
                                                                            skip_batches=9), 2), strict=False)]
    assert resumed == full[9:]


# ---- the recipe's checks of each set ---------------------------------------------------------------------------

def sets_recipe(tiny_model, *entries: str, extra: tuple[str, ...] = ()):
    return load_recipe(REPO / "recipes" / "tiny_demo.yaml", [
        f"model.name_or_path={tiny_model}", f"data.shards=[{', '.join(entries)}]", "model.language=null", *extra])


def test_two_sets_resolve_to_their_index_languages(demo_shards, tiny_model):
    recipe = sets_recipe(tiny_model, f"{{path: {demo_shards['shards']}, weight: 3}}",
                         f"{{path: {demo_shards['shards_es']}, weight: 1}}", extra=("eval.select_by=es",))
    sets, _ = check_against_data_and_model(recipe)
    assert [(s.language, s.weight) for s in sets] == [("fr", 3.0), ("es", 1.0)]


def test_bad_shard_sets_are_named_with_every_problem(demo_shards, tiny_model, tmp_path):
    fr, es, fr128 = demo_shards["shards"], demo_shards["shards_es"], demo_shards["shards128"]
    with pytest.raises(LauncherError) as e:
        sets_recipe(tiny_model, f"{{path: {fr}, weight: 1}}", f"{{path: {es}}}", f"{{path: {fr}, weight: 0}}",
                    extra=("model.language=fr", "data.mix_temperature=2"))
    msg = str(e.value)
    assert "data.shards.list[ShardSet].2.weight: got 0" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text(json.dumps({**json.loads((es / "index.json").read_text()),
                                                "source": {"language": "klingon"}}))
    with pytest.raises(LauncherError) as e:
        check_against_data_and_model(sets_recipe(tiny_model, f"{{path: {fr}}}", f"{{path: {fr128}}}",
                                                 f"{{path: {bad}}}", f"{{path: {es}, language: de}}",
                                                 extra=("eval.select_by=it", "eval.splits=[validation, dev]")))
    msg = str(e.value)
    assert "data.shards[1]: features in" in msg and "n_mels=128" in msg
    assert "data.shards[2]: index.json's language 'klingon' is not one of Whisper's" in msg
    assert "data.shards[3].language: got 'de', but the shards in" in msg
    assert "eval.splits[1]: got 'dev'" in msg
    assert "one set per language" in msg  # fr twice (the 128-bin copy)
    assert "eval.select_by: got 'it'" in msg
    with pytest.raises(LauncherError) as e:
        sets_recipe(tiny_model, f"{{path: {fr}, weight: 1}}", f"{{path: {es}}}",
                    extra=("model.language=fr", "data.mix_temperature=2"))
    msg = str(e.value)
    assert "model.language: got 'fr', expected unset with several shard sets" in msg
    assert "a weight for every set, or none" in msg and "data.mix_temperature: got 2.0" in msg
    with pytest.raises(LauncherError, match="each folder once"):
        sets_recipe(tiny_model, f"{{path: {fr}}}", f"{{path: {fr}}}")
