"""bench/gpu_check.sh, the one prepared GPU check, run for real at tiny size on the CPU (`--cpu`): every part ends
and leaves figures that make sense, so the script works the first time a GPU machine is lent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = {"build", "zero2", "zero3", "throughput"}


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # the script mirrors its results to $OUT when set
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.long  # a dry run of the GPU check (its DeepSpeed launches and the HF Trainer baseline), ~90 s
def test_cpu_check_runs_every_part_and_writes_sane_figures(tmp_path: Path):
    out, mirror = tmp_path / "gpu_check_cpu.json", tmp_path / "mirror"
    proc = run_check("--out", str(out), "--work", str(tmp_path / "work"), "--mirror", str(mirror), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["mode"] == "cpu" and r["ranks"] == 2 and r["torch"] and r["deepspeed"]
    assert set(r["parts"]) == PARTS and all(p["ok"] and p["rc"] == 0 for p in r["parts"].values())
    assert json.loads((mirror / out.name).read_text())["complete"] and (mirror / "gpu_check.log").is_file()
    assert not any((tmp_path / "work").iterdir())  # the scratch folder (model, shards, runs) is removed

    build = r["parts"]["build"]
    assert 51866 * 64 < build["parameters"] < 5_000_000  # large-v3's vocabulary rows on the tiny model
    assert build["model_dtype_on_disk"] == "bfloat16" and build["shard_samples"]["validation"] >= 5

    for stage in ("zero2", "zero3"):
        p = r["parts"][stage]
        assert all(p["checks"].values()), p["checks"]
        assert [w["step"] for w in p["windows"]] == [1, 2, 3]
        # random weights over 51866 rows start near ln(51866) = 10.86
        assert all(math.isfinite(w["loss"]) and 9 < w["loss"] < 12 for w in p["windows"])
        assert 0 < p["samples_per_s"] < 1000 and 0 < p["tokens_per_s"] < 100_000
        assert all(w["paused_s"] >= 0 for w in p["windows"][1:])
        evals = p["evaluations"]
        assert [e["step"] for e in evals] == [2, 3]  # every 2 steps, and at the end
        assert all(e["samples"] == 5 and e["world_size"] == 2 and e["seconds"] > 0 for e in evals)  # 3 + 2 clips
        mfu = p["mfu_estimate"]
        assert mfu["achieved_tflops"] > 0 and mfu["mfu"] is None  # no GPU peak on the CPU
        assert 1 <= mfu["label_len"] <= 448
        assert p["peak_gpu_memory_gib"] is None and 0.05 < p["peak_rss_gib"] < 20
        assert p["checkpoints"] == ["step-3"] and p["checkpoint_bytes"] > 0
        assert r["summary"][stage]["samples_per_s"] == p["samples_per_s"]

    t = r["parts"]["throughput"]
    assert t["with_baseline"] and t["project"]["samples_per_s"] > 0 and t["baseline"]["samples_per_s"] > 0
    assert t["speedup_samples_per_s"] == pytest.approx(t["project"]["samples_per_s"] / t["baseline"]["samples_per_s"])
    assert "launcher.train.train_step" in t["project"]["what_ran"]


def test_a_budget_too_small_skips_every_part_but_still_writes_the_results(tmp_path: Path):
    out = tmp_path / "r.json"
    proc = run_check("--out", str(out), "--budget", "0", timeout=120)
    assert proc.returncode == 1
    r = json.loads(out.read_text())
    assert not r["complete"] and set(r["parts"]) == PARTS
    assert all(not p["ok"] and "skipped" in p for p in r["parts"].values())
    assert r["device"].startswith("CPU")


def test_tiny_model_takes_large_v3_vocabulary_rows_and_the_extra_ids_decode_to_nothing(tmp_path: Path):
    from transformers import WhisperConfig, WhisperTokenizer

    from launcher.tiny_model import build_tiny_whisper

    folder = build_tiny_whisper(tmp_path / "m", n_mels=128, model_vocab_size=51866)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    assert WhisperConfig.from_pretrained(folder).vocab_size == 51866 > len(tokenizer)
    assert tokenizer.decode([51000, 51865], skip_special_tokens=True) == ""
    with pytest.raises(ValueError, match="model_vocab_size"):
        build_tiny_whisper(tmp_path / "small", model_vocab_size=len(tokenizer) - 1)
