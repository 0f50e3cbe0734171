"""`launcher evaluate` on one process and on 2 CPU ranks under ZeRO-2 and ZeRO-3: every clip once, same scores."""

from __future__ import annotations

import json
import subprocess

import jiwer
import pytest
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from launcher.evaluate import scan_split
from tests.conftest import REPO, cpu_env, deepspeed_cmd, free_port, run_cli

ARGS = ("--split", "test", "--max-new-tokens", "12", "--batch-size", "1")


def evaluate_args(tiny_model, shards, out) -> list[str]:
    return ["evaluate", "--model", str(tiny_model), "--shards", str(shards), "--out", str(out), *ARGS]


def load(out):
    report = json.loads((out / "test.json").read_text())
    rows = [json.loads(x) for x in (out / "test.predictions.jsonl").read_text().splitlines()]
    return report, rows


@pytest.fixture(scope="module")
def single(tiny_model, demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    proc = run_cli(*evaluate_args(tiny_model, demo_shards["shards"], out))
    assert "test: WER" in proc.stdout
    return load(out)


def test_single_process_report_scores_every_clip_once_and_matches_jiwer(single, demo_shards):
    report, rows = single
    items = scan_split(demo_shards["shards"], "test")
    assert [r["id"] for r in rows] == [it.id for it in items] and report["samples"] == len(items) == 8
    assert report["decode"]["num_beams"] == 1 and report["decode"]["language"] == "fr"
    assert report["world_size"] == 1 and report["samples_per_s"] > 0
    norm = BasicTextNormalizer()
    kept = [r for r in rows if norm(r["reference"]).strip()]
    expected = 100 * jiwer.wer([norm(r["reference"]).strip() for r in kept],
                               [norm(r["prediction"]).strip() for r in kept])
    assert report["wer"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_cpu_ranks_under_zero_give_the_single_process_scores(single, tiny_model, demo_shards, tmp_path,
                                                                 zero_stage):
    out = tmp_path / "eval"
    cmd = deepspeed_cmd("--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank", "--module",
                        "launcher", *evaluate_args(tiny_model, demo_shards["shards"], out), "--zero-stage",
                        str(zero_stage))
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, rows = load(out)
    ref_report, ref_rows = single
    assert report["world_size"] == 2
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in ref_rows]
    for key in ("wer", "wer_orthographic", "cer", "samples", "scored"):
        assert report[key] == ref_report[key], key


def test_missing_model_is_a_clear_error(demo_shards, tmp_path):
    proc = run_cli("evaluate", "--model", str(tmp_path / "nope"), "--shards", str(demo_shards["shards"]), check=False)
    assert proc.returncode == 2 and "cannot load a Whisper model" in proc.stderr and "Traceback" not in proc.stderr
