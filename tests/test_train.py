"""Real multi-process DeepSpeed training on the CPU (gloo): ZeRO-2, ZeRO-3, two "nodes" on loopback, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

from launcher import audio
from tests.conftest import (
    DEMO,
    LEARNT_LANGUAGE_TOKEN,
    SMALL_FIXED_SET,
    ZERO2_STEPS,
    demo_rows,
    read_log,
    run_cli,
    run_training,
)
from tests.conftest import run_overrides as overrides

pytestmark = pytest.mark.slow


def test_zero2_on_two_ranks_overfits_a_small_fixed_set(zero2_run):
    log = read_log(zero2_run)
    assert [r["step"] for r in log] == list(range(10, ZERO2_STEPS + 1, 10))
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.3 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert all(np.isfinite(r["grad_norm"]) and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert log[-1]["lr"] < log[1]["lr"], "linear decay after warm-up"
    ds = json.loads((zero2_run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 and ds["zero_optimization"]["stage"] == 2
    assert (zero2_run / "recipe.yaml").is_file() and list((zero2_run / "tensorboard").iterdir())
    assert sorted(p.name for p in (zero2_run / "checkpoints").iterdir() if p.is_dir()) == [f"step-{ZERO2_STEPS}",
                                                                                        "step-60"]


def test_logged_throughput_is_samples_over_the_wall_time_of_the_window(zero2_run):
    """samples_per_s covers the whole logging window (10 steps of 2 ranks x 4 clips), not its last step only: it
    matches the wall time between two log lines, except after a checkpoint (saving is not training time)."""
    log = read_log(zero2_run)
    compared = 0
    for prev, cur in zip(log, log[1:], strict=False):
        if prev["step"] % 60:  # no checkpoint saved between the two lines
            wall = cur["time"] - prev["time"]
            assert 10 * 8 / cur["samples_per_s"] == pytest.approx(wall, rel=0.15, abs=0.5), (prev, cur)
            compared += 1
    assert compared >= 8


def test_a_pipeline_of_the_final_model_reproduces_the_evaluations_transcripts(zero2_run):
    """The exported generation config carries the decoding the reported WER was measured with (greedy, language and
    task forced, the same length limit), so `pipeline(model=final)` on the raw audio, with no arguments, gives the
    evaluation's transcripts (transformers' pipeline would otherwise default Whisper to beam search)."""
    final = zero2_run / "final"
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and generation["language"] == "fr" and generation["task"] == "transcribe"
    report = json.loads((zero2_run / "eval" / f"test-step-{ZERO2_STEPS}.json").read_text())
    rows = [json.loads(x) for x in (zero2_run / "eval" / f"test-step-{ZERO2_STEPS}.predictions.jsonl").read_text()
            .splitlines()]
    asr = pipeline("automatic-speech-recognition", model=str(final), device="cpu")
    paths = {r["path"].removesuffix(".mp3"): r["path"] for r in demo_rows("test.tsv")}
    agree = 0
    for row in rows:
        pcm = audio.decode_audio((DEMO / "clips" / paths[row["id"]]).read_bytes())
        agree += asr({"raw": pcm, "sampling_rate": 16000})["text"].strip() == row["prediction"]
    assert report["samples"] == len(rows) == 8 and agree == len(rows), f"{agree} of {len(rows)} agree"
    assert WhisperForConditionalGeneration.from_pretrained(final).config.use_cache, "exported ready to generate"
    assert (final / "preprocessor_config.json").is_file(), "what converters and older transformers read"
    assert WhisperProcessor.from_pretrained(final).tokenizer is not None


def test_uneven_shards_over_several_epochs_end_on_every_rank(tiny_model, demo_shards, tmp_path):
    """44 clips in 4 shards of unequal size, 2 ranks x 2 workers, batches of 3: epochs end mid-batch at
    different places on each rank. Every rank must run the same 24 steps (over 3 epochs) and the job must end."""
    run_dir = tmp_path / "run"
    run_training(overrides(tiny_model, demo_shards["shards"], run_dir, "optim.max_steps=24",
                           "eval.test_at_end=false", "data.batch_size_per_gpu=3", "data.num_workers=2",
                           "checkpoint.every_steps=0", "logging.every_steps=10"), timeout=300)
    log = read_log(run_dir)
    assert log[-1]["step"] == 24 and log[-1]["epoch"] >= 3


def test_two_languages_train_and_are_evaluated_reported_and_carded_each_on_their_own(tiny_model, demo_shards,
                                                                                    tmp_path):
    """fr (44 clips) and es (20) mixed 3:1; every evaluation scores each language's validation split with its own
    language token; the best checkpoint is the best mean; test is scored per language and the card's model-index
    (read back with huggingface_hub's own parser) has one result per language."""
    from huggingface_hub import ModelCard

    run_dir = tmp_path / "run"
    shards = f"[{{path: {demo_shards['shards']}, weight: 3}}, {{path: {demo_shards['shards_es']}, weight: 1}}]"
    proc = run_training([*overrides(tiny_model, demo_shards["shards"], run_dir, "optim.max_steps=12",
                                    "eval.every_steps=6", "eval.max_new_tokens=20", "checkpoint.every_steps=0",
                                    "checkpoint.keep_best=1", "logging.every_steps=6", "logging.sample_ids=true"),
                         f"data.shards={shards}", "model.language=null"])
    out = " ".join(proc.output.split())
    assert "each epoch of 64 samples holds fr 48 (75.0%, 1.09 of a pass), es 16 (25.0%, 0.80 of a pass)" in out
    assert "language token learnt" in out
    reports = {(lang, step): json.loads((run_dir / "eval" / f"validation-{lang}-step-{step}.json").read_text())
               for lang in ("fr", "es") for step in (6, 12)}
    assert all(r["samples"] == 8 and r["decode"]["language"] == lang for (lang, _), r in reports.items())
    for step in (6, 12):
        mean = (reports[("fr", step)]["wer"] + reports[("es", step)]["wer"]) / 2
        assert f"step {step}: validation mean WER {mean:.2f}% over fr, es" in out
        summary = json.loads((run_dir / "eval" / f"validation-mean-step-{step}.json").read_text())
        assert summary["wer_mean"] == pytest.approx(mean) and set(summary["languages"]) == {"fr", "es"}
    best = min((6, 12), key=lambda s: ((reports[("fr", s)]["wer"] + reports[("es", s)]["wer"]) / 2, -s))
    loop = json.loads((run_dir / "checkpoints" / "step-12" / "loop.json").read_text())
    assert loop["best"][0][1] == best
    seen = [i for f in (run_dir / "samples").glob("rank-*.jsonl") for line in f.read_text().splitlines()
            for i in json.loads(line)["ids"]]
    spanish = sum("_es_" in i for i in seen)
    assert len(seen) == 96 and abs(spanish - 24) <= 2, "3:1 over 12 steps of 2 x 4 clips (within a clip a rank)"
    tests = {lang: json.loads((run_dir / "eval" / f"test-{lang}-step-{best}.json").read_text())
             for lang in ("fr", "es")}
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.language == ["fr", "es"]
    results = {(r.dataset_config, r.metric_name): r for r in card.data.eval_results}
    assert set(results) == {(lang, m) for lang in ("fr", "es") for m in ("Wer", "Orthographic Wer", "Cer")}
    for lang in ("fr", "es"):
        r = results[(lang, "Wer")]
        assert r.task_type == "automatic-speech-recognition" and r.dataset_split == "test"
        assert r.metric_value == round(tests[lang]["wer"], 2)
    assert f"step-{best}" in card.content and "weight: 3" in card.content, "the selection and the recipe"
    generation = json.loads((run_dir / "final" / "generation_config.json").read_text())
    assert generation.get("language") is None, "a model of two languages detects the language itself"


def test_zero3_keeps_the_best_checkpoint_by_wer_and_delivers_and_cards_it_from_another_number_of_ranks(
        zero2_run, demo_shards, tmp_path):
    """A ZeRO-3 run evaluated every 4 steps stops at 8 on 2 ranks and ends at 12 on 1: the checkpoints kept are the
    last and the best by validation WER, best/ holds it, and the delivered model (final/) is the best checkpoint's
    weights, read from partitions another number of ranks wrote (DeepSpeed's own load without optimizer states reads
    the folder's latest checkpoint, whatever the tag), scored on test and carded. By construction the best step comes
    before the last: the run starts from a model that has learnt the validation clips and trains on others at a high
    learning rate, so its validation WER gets worse."""
    run_dir = tmp_path / "run"
    args = overrides(zero2_run / "final", demo_shards["shards"], run_dir, "deepspeed.zero_stage=3",
                     "eval.every_steps=4", "eval.splits=[validation]", "eval.max_new_tokens=20",
                     "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.keep_best=1",
                     "logging.every_steps=4", "optim.warmup_steps=1", LEARNT_LANGUAGE_TOKEN)
    run_training([*args, "optim.max_steps=8"])
    run_training([*args, "optim.max_steps=12"], ranks=1, extra=("--resume",))
    reports = {step: json.loads((run_dir / "eval" / f"validation-step-{step}.json").read_text())
               for step in (4, 8, 12)}
    assert [r["world_size"] for r in reports.values()] == [2, 2, 1] and all(r["samples"] == 8 for r in
                                                                            reports.values())
    best_step = min(reports, key=lambda s: (reports[s]["wer"], -s))
    assert best_step != 12, f"the best step must be one the 2 ranks wrote for this test: {reports}"
    kept = {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()}
    assert kept == {"step-12", f"step-{best_step}"}, "the last checkpoint plus the best by WER"
    loop = json.loads((run_dir / "checkpoints" / "step-12" / "loop.json").read_text())
    assert loop["best"] == [[reports[best_step]["wer"], best_step]]
    final = WhisperForConditionalGeneration.from_pretrained(run_dir / "final").state_dict()
    best = WhisperForConditionalGeneration.from_pretrained(run_dir / "best").state_dict()
    assert all(torch.equal(final[k], best[k]) for k in final), "the delivered model is the best one"
    test = json.loads((run_dir / "eval" / f"test-step-{best_step}.json").read_text())
    card = (run_dir / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    result = front["model-index"][0]["results"][0]
    assert result["task"]["type"] == "automatic-speech-recognition"
    assert result["dataset"]["split"] == "test" and result["dataset"]["config"] == "fr"
    assert result["metrics"][0] == {"type": "wer", "value": round(test["wer"], 2), "name": "Wer"}
    assert f"step-{best_step}" in card


def test_periodic_evaluation_under_zero3_with_a_rank_holding_no_clip_matches_one_process(zero2_run, demo_shards,
                                                                                         tmp_path):
    """Training's own evaluation under ZeRO-3, 2 ranks, 1 clip: rank 0 decodes it, rank 1 has nothing to decode. It
    used to run ZeRO-3's weight gathering per token on rank 0 alone, and the job aborted or hung."""
    run_dir = tmp_path / "run"
    run_training(overrides(zero2_run / "final", demo_shards["shards"], run_dir, *SMALL_FIXED_SET,
                           "deepspeed.zero_stage=3", "optim.max_steps=2", "optim.warmup_steps=1", "optim.lr=1e-6",
                           "eval.every_steps=2", "eval.max_samples=1", "checkpoint.keep_best=1",
                           "checkpoint.every_steps=0", "eval.test_at_end=false", "logging.every_steps=1"))
    report = json.loads((run_dir / "eval" / "validation-step-2.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "eval" / "validation-step-2.predictions.jsonl").read_text().splitlines()]
    assert report["world_size"] == 2 and report["samples"] == 1
    single = tmp_path / "single"
    run_cli("evaluate", "--model", str(run_dir / "final"), "--shards", str(demo_shards["shards"]), "--split",
            "validation", "--max-samples", "1", "--max-new-tokens", "20", "--out", str(single))
    ref = [json.loads(x) for x in (single / "validation.predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in ref]
    assert report["wer"] == json.loads((single / "validation.json").read_text())["wer"]


def test_gradient_checkpointing_frozen_encoder_and_spec_augment_train(tiny_model, demo_shards, tmp_path):
    """The memory and regularisation options run for real: the frozen encoder comes back unchanged, the decoder
    learns, with activations recomputed and SpecAugment masks drawn."""
    run_dir = tmp_path / "run"
    run_training(overrides(tiny_model, demo_shards["shards"], run_dir, *SMALL_FIXED_SET, "optim.max_steps=16",
                           "checkpoint.every_steps=0", "logging.every_steps=5", "model.gradient_checkpointing=true",
                           "model.freeze_encoder=true", "model.spec_augment.enabled=true",
                           "model.spec_augment.mask_time_prob=0.2", "model.attn_implementation=eager"))
    log = read_log(run_dir)
    assert log[-1]["loss"] < log[0]["loss"]
    final = WhisperForConditionalGeneration.from_pretrained(run_dir / "final").state_dict()
    initial = WhisperForConditionalGeneration.from_pretrained(tiny_model).state_dict()
    encoder = [k for k in final if k.startswith("model.encoder.")]
    decoder = [k for k in final if k.startswith("model.decoder.layers.")]
    assert encoder and all(torch.equal(final[k], initial[k]) for k in encoder)
    assert any(not torch.equal(final[k], initial[k]) for k in decoder)
