"""Long-form evaluation: recordings joined from a split's clips (never over the length asked, one speaker each, every
clip once, in order), decoded with transformers' sequential long-form generate, scored on the joined references;
on one process, in periodic evaluation, and on 2 CPU ranks under ZeRO-3 with the single process's predictions."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from launcher.errors import LauncherError
from launcher.evaluation.items import EvalItem, scan_split
from launcher.evaluation.longform import GAP_SECONDS, build_recordings, timestamp_checks
from launcher.evaluation.run import evaluate
from launcher.evaluation.scoring import normalizer_for, score
from launcher.features import N_FRAMES
from launcher.model import DecodeSettings
from launcher.recipe.load import load_recipe
from launcher.shards.format import load_index
from launcher.shards.reader import MelRef
from tests.conftest import REPO, SMALL_FIXED_SET, run_cli, run_overrides, run_training
from tests.test_evaluate import two_ranks


def fake_items(n: int, seed: int = 0) -> list[EvalItem]:
    """Clips of 0.5..12 s and a few of 45 s (longer than any recording asked for) from two speakers and from
    nobody."""
    rng = random.Random(seed)
    return [EvalItem(f"c{i:03d}", f"mot{i}", 45.0 if i % 17 == 5 else round(rng.uniform(0.5, 12.0), 4),
                     MelRef(Path("-"), 0, 0), rng.choice(["alice", "bob", None])) for i in range(n)]


@pytest.mark.parametrize("seconds", [5.0, 10.0, 30.0])
def test_recordings_hold_every_clip_once_in_order_one_speaker_each_and_never_exceed_the_length(seconds):
    items = fake_items(200)
    recordings = build_recordings(items, seconds)
    position = {it.id: i for i, it in enumerate(items)}
    assert sorted(c.id for r in recordings for c in r.clips) == [it.id for it in items]
    firsts = [position[r.clips[0].id] for r in recordings]
    assert firsts == sorted(firsts)
    for r in recordings:
        assert len({c.speaker for c in r.clips}) == 1
        assert [position[c.id] for c in r.clips] == sorted(position[c.id] for c in r.clips)
        assert r.seconds == pytest.approx(sum(c.seconds for c in r.clips) + GAP_SECONDS * (len(r.clips) - 1))
        assert r.seconds <= seconds or len(r.clips) == 1
    # closed only when the speaker's next clip would not fit
    for speaker in ("alice", "bob", None):
        mine = [r for r in recordings if r.clips[0].speaker == speaker]
        for r, following in zip(mine, mine[1:], strict=False):
            assert r.seconds + GAP_SECONDS + following.clips[0].seconds > seconds
    assert any(len(r.clips) > 1 for r in recordings) and any(r.clips[0].seconds > seconds for r in recordings)


def test_clips_without_speakers_are_joined_in_index_order():
    items = [dataclasses.replace(it, speaker=None, seconds=2.0) for it in fake_items(10)]
    recordings = build_recordings(items, 7.0)  # 2 + 0.5 + 2 + 0.5 + 2 = 7
    assert [[c.id for c in r.clips] for r in recordings] == [[f"c{i:03d}" for i in range(j, min(j + 3, 10))]
                                                             for j in range(0, 10, 3)]
    assert recordings[0].text == "mot0 mot1 mot2" and recordings[0].id == "c000+2"
    assert recordings[-1].id == "c009"
    with pytest.raises(ValueError, match="positive"):
        build_recordings(items, 0)


def test_timestamps_are_checked_for_order_and_for_lying_inside_the_audio():
    assert timestamp_checks([(0.0, 2.0), (2.0, 5.5), (5.5, 10.4)], 10.0) == {"timestamps_monotone": True,
                                                                            "timestamps_inside": True}
    assert timestamp_checks([(4.0, 6.0), (1.0, 3.0)], 10.0)["timestamps_monotone"] is False
    assert timestamp_checks([(3.0, 2.0)], 10.0)["timestamps_monotone"] is False
    assert timestamp_checks([(0.0, 2.0), (2.0, 10.6)], 10.0)["timestamps_inside"] is False
    assert timestamp_checks([], 10.0) == {"timestamps_monotone": True, "timestamps_inside": True}


def test_a_recordings_features_hold_each_clip_at_its_start_in_one_window(demo_shards):
    items = scan_split(load_index(demo_shards["shards"]), "test")
    (r,) = [r for r in build_recordings(items, 20) if r.clips[0].id == items[0].id]
    joined = r.features()
    assert joined.dtype == np.float32 and joined.shape[-1] == pytest.approx(100 * r.seconds, abs=3)
    floor = joined.max() - 2.0  # Whisper's clamp: 8 log10 units below the recording's maximum, after (x + 4) / 4
    for clip, start in zip(r.clips, r.starts, strict=True):
        mel = clip.mel.load().astype(np.float32)
        at = round(100 * start)
        np.testing.assert_allclose(joined[:, at: at + mel.shape[-1]], np.maximum(mel, floor))
    gap = round(100 * (r.starts[0] + r.clips[0].seconds)) + 5
    assert np.all(joined[:, gap: gap + 40] == floor)  # silence between clips
    single = build_recordings(items[:1], 1.0)[0].features()
    np.testing.assert_array_equal(single, items[0].mel.load().astype(np.float32))


def test_long_form_flag_is_checked(tiny_model, demo_shards):
    proc = run_cli("evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]), "--long-form", "0",
                   check=False)
    assert proc.returncode == 2 and "--long-form must be a positive number of seconds" in proc.stderr
    with pytest.raises(LauncherError, match="eval.long_form_seconds"):
        load_recipe(REPO / "recipes" / "tiny_demo.yaml", ["eval.long_form_seconds=-5"])


ARGS = ("--split", "test", "--long-form", "20", "--max-new-tokens", "12", "--batch-size", "2")


def load(out: Path, name: str):
    report = json.loads((out / f"{name}.json").read_text())
    rows = [json.loads(x) for x in (out / f"{name}.predictions.jsonl").read_text().splitlines()]
    return report, rows


@pytest.fixture(scope="module")
def single(tiny_model, demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("long1")
    proc = run_cli("evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]), "--out", str(out),
                   *ARGS)
    assert "test-long-20s: WER" in proc.stdout and "recordings" in proc.stdout
    return load(out, "test-long-20s")


def test_cli_scores_joined_recordings_against_their_joined_references(single, demo_shards):
    report, rows = single
    items = scan_split(load_index(demo_shards["shards"]), "test")
    by_id = {it.id: it for it in items}
    # the demo's test split alternates two speakers: one recording each, of 4 clips, under 20 s
    assert report["split"] == "test-long-20s" and report["long_form_seconds"] == 20
    assert report["recordings"] == report["samples"] == len(rows) == 2 and report["clips"] == len(items) == 8
    assert sorted(c for r in rows for c in r["clips"]) == sorted(by_id)
    for r in rows:
        clips = [by_id[c] for c in r["clips"]]
        assert len({c.speaker for c in clips}) == 1 and r["seconds"] <= 20
        assert r["reference"] == " ".join(c.text for c in clips) and r["references"] == [c.text for c in clips]
        assert " ".join(r["predictions"]).split() == r["prediction"].split()  # the segments' texts make it up
        assert r["segments"] and all(len(s) == 2 for s in r["segments"])
    for key in ("timestamps_monotone", "timestamps_inside"):
        assert report[key] == sum(r[key] for r in rows) / len(rows)
    norm = BasicTextNormalizer()
    expected = 100 * jiwer.wer([" ".join(norm(by_id[c].text).strip() for c in r["clips"]) for r in rows],
                               [" ".join(norm(t).strip() for t in r["predictions"]).strip() for r in rows])
    assert report["wer"] == pytest.approx(expected, abs=1e-9)


def test_a_recording_is_normalised_clip_by_clip_so_brackets_cannot_swallow_the_clips_between_them():
    """Whisper's normaliser drops text between brackets. Clips of a German recording of the packing benchmark: the
    second opens a parenthesis the fourth closes; normalising the joined text dropped 19 of 40 words."""
    clips = ["Zufrieden werden, großes Glück, zufrieden bleiben, Meisterstück.",
             "Wir irren in nichts mehr als in unsern Prophezeiungen, daß künftig etwas werde schlimmer (z.B.",
             "daß kein Anlaß dazu besteht, eine Putzfrau zu entlassen, bloß weil sie regelmäßig was abstaubt?",
             "Toni Polster (über sein verbessertes Verhältnis zu Trainer Peter Neururer)"]
    norm = BasicTextNormalizer()
    recording = {"id": "r", "reference": " ".join(clips), "references": clips,
                 "prediction": " ".join(clips), "predictions": [" ".join(clips[:2]), " ".join(clips[2:])]}
    scores, (row,) = score([recording], normalizer_for("de"))
    assert row["words"] == sum(len(norm(c).split()) for c in clips) == 40
    assert scores["wer"] == 0 and row["reference_normalized"] == " ".join(norm(c).strip() for c in clips)
    # a clip scored alone is normalised as before
    _, (alone,) = score([{"id": "c", "reference": clips[3], "prediction": ""}], normalizer_for("de"))
    assert alone["reference_normalized"] == norm(clips[3]).strip() == "toni polster"


def test_recordings_over_30_s_decode_window_after_window_the_same_in_any_batch(tiny_model_30s, demo_shards, tmp_path):
    """Without speakers the training clips make recordings of 36-39 s (long-form: generate slides its window) and
    one short leftover (short-form). Decoded alone or batched together, each recording gives the same result:
    short and long recordings never share a `generate` call, which would turn the short one long-form."""
    items = [dataclasses.replace(it, speaker=None)
             for it in scan_split(load_index(demo_shards["shards"]), "train", max_samples=32)]
    processor = WhisperProcessor.from_pretrained(tiny_model_30s)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_30s).eval()
    results = []
    for batch in (1, 3):
        settings = DecodeSettings(language="fr", batch_size=batch, max_new_tokens=12)
        report = evaluate(model, processor.tokenizer, items, settings, split="train", device=torch.device("cpu"),
                          dtype=torch.float32, out_dir=tmp_path / f"b{batch}", long_form=40)
        results.append(load(tmp_path / f"b{batch}", "train-long-40s")[1])
    rows = results[0]
    assert report["recordings"] == len(rows) == 3 and report["clips"] == 32
    assert [r["seconds"] > N_FRAMES / 100 for r in rows] == [True, True, False]
    for r in rows[:2]:  # a second window was decoded: segments start after the first 30 s
        assert max(start for start, _ in r["segments"]) >= 30
    assert max(end for _, end in rows[2]["segments"]) <= 30
    assert [(r["prediction"], r["segments"]) for r in results[1]] == [(r["prediction"], r["segments"]) for r in rows]


@pytest.mark.slow
def test_zero3_ranks_with_uneven_recordings_give_the_single_process_predictions(tiny_model, demo_shards, tmp_path):
    """5-s recordings of the first 7 test clips: 5 recordings, 3 on rank 0 and 2 on rank 1, decoded on the
    materialized copy (no collective per token) and gathered to rank 0."""
    args = ["evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]), "--split", "test",
            "--long-form", "5", "--max-samples", "7", "--max-new-tokens", "12", "--batch-size", "1"]
    run_cli(*args, "--out", str(tmp_path / "one"))
    two_ranks(*args, "--out", str(tmp_path / "two"), "--zero-stage", "3")
    (ref_report, ref_rows), (report, rows) = load(tmp_path / "one", "test-long-5s"), load(tmp_path / "two",
                                                                                        "test-long-5s")
    assert report["world_size"] == 2 and report["recordings"] == ref_report["recordings"] == 5
    assert rows == ref_rows
    for key in ("wer", "wer_orthographic", "cer", "timestamps_monotone", "timestamps_inside"):
        assert report[key] == ref_report[key], key


@pytest.mark.slow
def test_periodic_evaluation_also_scores_long_form_and_keeps_choosing_by_clip_wer(tiny_model, demo_shards,
                                                                                 tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = run_training(run_overrides(tiny_model, demo_shards["shards"], run_dir, *SMALL_FIXED_SET,
                                      "optim.max_steps=2", "optim.warmup_steps=1", "checkpoint.every_steps=2",
                                      "logging.every_steps=1", "eval.every_steps=2", "eval.max_new_tokens=8",
                                      "eval.max_samples=2", "eval.long_form_seconds=20", "checkpoint.keep_best=1"),
                        ranks=1)
    out = proc.output
    assert "validation long-form (20 s recordings) WER" in out and "test long-form (20 s recordings) WER" in out
    long_val = json.loads((run_dir / "eval" / "validation-long-20s-step-2.json").read_text())
    long_test = json.loads((run_dir / "eval" / "test-long-20s-step-2.json").read_text())
    assert long_val["clips"] == 2 and long_test["recordings"] == 2 and long_val["step"] == long_test["step"] == 2
    clip_val = json.loads((run_dir / "eval" / "validation-step-2.json").read_text())
    assert f"best validation WER {clip_val['wer']:.2f}%" in out  # final/ was chosen by clip WER
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("eval/validation/wer_long")] == [pytest.approx(long_val["wer"])]
    assert [e.value for e in events.Scalars("eval/validation/wer")] == [pytest.approx(clip_val["wer"])]
