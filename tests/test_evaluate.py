"""`launcher evaluate` on one process and on 2 CPU ranks under ZeRO-2 and ZeRO-3: every clip once, same scores,
also when the ranks have different numbers of clips (one none) and decode transcripts of different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pytest
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from launcher.evaluation.items import scan_split
from launcher.evaluation.reports import default_report_dir
from launcher.shards.format import load_index
from launcher.testing.commands import Finished, run_ranks
from tests.conftest import run_cli

ARGS = ("--split", "test", "--max-new-tokens", "12", "--batch-size", "1")


def evaluate_args(model, shards, out, *args: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--shards", str(shards), "--out", str(out), *(args or ARGS)]


def load(out, split: str = "test"):
    report = json.loads((out / f"{split}.json").read_text())
    rows = [json.loads(x) for x in (out / f"{split}.predictions.jsonl").read_text().splitlines()]
    return report, rows


def two_ranks(*args: str) -> Finished:
    """`python -m launcher ARGS` on 2 warm CPU ranks (as `deepspeed --num_gpus 2 --module launcher ARGS` starts
    them); their output beside the --out folder."""
    out = Path(args[args.index("--out") + 1])
    return run_ranks("launcher", args, logs=out.with_name(out.name + "-logs"))


@pytest.fixture(scope="module")
def single(tiny_model, demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    proc = run_cli(*evaluate_args(tiny_model, demo_shards["shards"], out))
    assert "test: WER" in proc.stdout
    return load(out)


def test_single_process_report_scores_every_clip_once_and_matches_jiwer(single, demo_shards):
    report, rows = single
    items = scan_split(load_index(demo_shards["shards"]), "test")
    assert [r["id"] for r in rows] == [it.id for it in items] and report["samples"] == len(items) == 8
    assert report["decode"]["num_beams"] == 1 and report["decode"]["language"] == "fr"
    assert report["world_size"] == 1 and report["samples_per_s"] > 0
    norm = BasicTextNormalizer()
    kept = [r for r in rows if norm(r["reference"]).strip()]
    expected = 100 * jiwer.wer([norm(r["reference"]).strip() for r in kept],
                               [norm(r["prediction"]).strip() for r in kept])
    assert report["wer"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_two_cpu_ranks_under_zero2_give_the_single_process_scores(single, tiny_model, demo_shards, tmp_path):
    out = tmp_path / "eval"
    two_ranks(*evaluate_args(tiny_model, demo_shards["shards"], out), "--zero-stage", "2")
    report, rows = load(out)
    ref_report, ref_rows = single
    assert report["world_size"] == 2
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in ref_rows]
    for key in ("wer", "wer_orthographic", "cer", "samples", "scored"):
        assert report[key] == ref_report[key], key


UNEVEN = ("--split", "validation", "--max-samples", "3", "--max-new-tokens", "20", "--batch-size", "1")


@pytest.mark.slow
def test_zero3_ranks_with_uneven_clips_and_transcript_lengths_give_the_single_process_predictions(
        zero2_run, demo_shards, tmp_path):
    """A model that has learnt the validation clips decodes them to transcripts of different lengths; 3 clips on 2
    ranks gives rank 0 two and rank 1 one. Under ZeRO-3 each forward used to gather weights with collectives, so
    the ranks issued different collectives and the job aborted (gloo) or hung (NCCL)."""
    model = zero2_run / "final"
    single_out, out = tmp_path / "single", tmp_path / "zero3"
    run_cli(*evaluate_args(model, demo_shards["shards"], single_out, *UNEVEN))
    two_ranks(*evaluate_args(model, demo_shards["shards"], out, *UNEVEN), "--zero-stage", "3")
    (ref_report, ref_rows), (report, rows) = load(single_out, "validation"), load(out, "validation")
    lengths = {len(r["prediction"].split()) for r in ref_rows}
    assert len(lengths) > 1, f"the transcripts must differ in length for this test to mean anything: {ref_rows}"
    assert report["world_size"] == 2 and report["samples"] == 3
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in ref_rows]
    for key in ("wer", "wer_orthographic", "cer", "samples", "scored"):
        assert report[key] == ref_report[key], key


@pytest.mark.slow
def test_decoding_under_zero3_runs_no_collective_per_token(zero2_run, demo_shards, tmp_path):
    """The evaluation gathers the weights once (a fixed number of collectives, the same on every rank), then
    decodes a plain copy: no collective at all while decoding, whatever each rank decodes. Decoding the ZeRO-3
    module itself costs collectives at every token."""
    out = tmp_path / "counts"
    run_ranks("tests/zero3_collectives.py", [str(zero2_run / "final"), str(demo_shards["shards"]), str(out)],
              logs=tmp_path / "logs")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["items"] for r in ranks] == [2, 1]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # different amounts of decoding on each rank
    for r in ranks:
        assert r["counts"].get("transcribe", 0) == 0, r["counts"]
        assert r["counts"]["hooked"] >= 2 * r["hooked_tokens"], "on the ZeRO-3 module: collectives at every token"
    assert ranks[0]["counts"]["materialize"] == ranks[1]["counts"]["materialize"] > 0
    print("collectives:", [r["counts"] for r in ranks], "tokens decoded on the ZeRO-3 module:",
          ranks[0]["hooked_tokens"])  # the figures for the note


def test_the_report_goes_to_the_current_directory_not_into_the_model(tmp_path):
    assert default_report_dir("runs/large_fr/final", cwd=tmp_path) == tmp_path / "eval" / "large_fr--final"
    assert default_report_dir("openai/whisper-large-v3", cwd=tmp_path) == tmp_path / "eval" / "openai--whisper-large-v3"


def test_evaluate_shows_progress_and_writes_beside_the_user(tiny_model, demo_shards, tmp_path):
    proc = run_cli("evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]), "--split", "test",
                   "--max-new-tokens", "4", "--max-samples", "4", cwd=tmp_path, env={"COLUMNS": "120"})
    assert "4/4" in proc.stderr and "clips/s" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "eval" / f"{tiny_model.parent.name}--{tiny_model.name}" / "test.json").is_file()
    assert not (tiny_model / "eval").exists()


def test_missing_model_is_a_clear_error(demo_shards, tmp_path):
    proc = run_cli("evaluate", "--model", str(tmp_path / "nope"), "--shards", str(demo_shards["shards"]), check=False)
    assert proc.returncode == 2 and "cannot load a Whisper model" in proc.stderr and "Traceback" not in proc.stderr


def test_several_shard_folders_are_scored_each_with_its_own_language_and_their_mean(tiny_model, demo_shards,
                                                                                   tmp_path):
    out = tmp_path / "out"
    proc = run_cli("evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]),
                   str(demo_shards["shards_es"]), "--split", "test", "--max-new-tokens", "4", "--max-samples", "5",
                   "--out", str(out))
    reports = {lang: load(out, f"test-{lang}") for lang in ("fr", "es")}
    for lang, (report, rows) in reports.items():
        assert report["split"] == f"test-{lang}" and report["decode"]["language"] == lang and len(rows) == 5
        assert all(f"_{lang}_" in row["id"] for row in rows)
    mean = (reports["fr"][0]["wer"] + reports["es"][0]["wer"]) / 2
    assert f"mean WER {mean:.2f}% over fr, es" in proc.stdout
    assert json.loads((out / "test-mean.json").read_text())["wer_mean"] == pytest.approx(mean)
    proc = run_cli("evaluate", "--model", str(tiny_model), "--shards", str(demo_shards["shards"]),
                   str(demo_shards["shards_es"]), "--language", "fr", check=False)
    assert proc.returncode == 2 and "--language is for one shards folder" in proc.stderr
