"""Real-model runs of the benchmarks (bench/packing.py, bench/langid.py): pretrained whisper-base fine-tuned on
synthetic espeak-ng speech, started as a user starts it (`deepspeed --num_gpus 1 train_ds.py --recipe ... --set
...`, one CPU rank with every core), and scored with `python -m launcher evaluate`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launcher.testing.assets import BENCH_CACHE
from launcher.testing.commands import REPO, TINY_RECIPE, deepspeed_cmd
from launcher.testing.env import cpu_env, free_port

# whisper-base fine-tuning as the benchmarks run it: encoder frozen (a full fine-tuning of base takes ~50 s a step on
# 2 cores, too few steps for a quality comparison), batch 8, fp32, constant lr, no periodic evaluation or checkpoints
COMMON = ("model.freeze_encoder=true", "data.batch_size_per_gpu=8", "data.num_workers=1", "deepspeed.precision=fp32",
          "optim.lr=1e-5", "optim.schedule=constant", "optim.warmup_steps=2", "eval.every_steps=0",
          "eval.test_at_end=false", "checkpoint.every_steps=0", "checkpoint.keep_best=0", "logging.every_steps=1")


def env() -> dict:
    """One rank with every core, offline."""
    return cpu_env(OMP_NUM_THREADS=str(os.cpu_count() or 1), PYTHONPATH=str(REPO))


def corpus_shards(corpus: Path, language: str, cache: Path = BENCH_CACHE) -> Path:
    """A synthetic corpus sharded once with `launcher shard` into `cache`."""
    out = Path(cache) / f"{Path(corpus).name}-shards"
    if not (out / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "launcher", "shard", "--lang", language, "--source", f"cv:{corpus}",
                        "--out", str(out), "--workers", "1", "--shard-size", "64"], cwd=REPO, env=env(), check=True)
    return out


def train(model: Path, shards: Path, run_dir: Path, overrides: Sequence[str], steps: int) -> list[dict]:
    """Fine-tune `model` for `steps` steps with COMMON and `overrides` (later ones win); its train_log.jsonl."""
    sets = [f"model.name_or_path={model}", f"data.shards={shards}", f"output_dir={run_dir}", *COMMON, *overrides,
            f"optim.max_steps={steps}"]
    cmd = deepspeed_cmd("--num_gpus", "1", "--master_port", str(free_port()), "--log_level", "error", "train_ds.py",
                        "--recipe", str(TINY_RECIPE), "--set", *sets)
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run_dir} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return read_log(run_dir)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def throughput(log: list[dict]) -> dict:
    """Rates over a run's steps past the first (loader start, first allocations), weighted by wall time."""
    later = log[1:] or log
    wall = sum(r["window_s"] for r in later)
    return {"steps": len(log), "audio_s_per_s": sum(r["audio_s_per_s"] * r["window_s"] for r in later) / wall,
            "samples_per_s": sum(r["samples_per_s"] * r["window_s"] for r in later) / wall,
            "tokens_per_s": sum(r["tokens_per_s"] * r["window_s"] for r in later) / wall,
            "seconds_per_step": wall / len(later), "final_loss": log[-1]["loss"]}


def evaluate(model: Path, shards: Path, out: Path, *, split: str = "test", long_form: float | None = None,
             max_samples: int | None = None, extra: Sequence[str] = ()) -> dict:
    """`python -m launcher evaluate` (greedy, as the event scored): its report, and the seconds it took."""
    cmd = [sys.executable, "-m", "launcher", "evaluate", "--model", str(model), "--shards", str(shards),
           "--split", split, "--batch-size", "16", "--out", str(out), *extra]
    if long_form:
        cmd += ["--long-form", str(long_form)]
    if max_samples:
        cmd += ["--max-samples", str(max_samples)]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    name = f"{split}-long-{long_form:g}s" if long_form else split
    report = json.loads((Path(out) / f"{name}.json").read_text())
    report["eval_seconds"] = time.perf_counter() - started
    return report


def runaways(predictions: Path) -> dict:
    """Greedy decoding without a repetition guard (as the event scored) sometimes loops until the token limit on a
    clip; a handful of such clips can decide a few-hundred-clip WER. Count them (over twice the reference's words
    plus 3) and give the WER of the other clips, so a comparison can tell the two apart."""
    rows = [json.loads(x) for x in Path(predictions).read_text().splitlines()]
    rows = [r for r in rows if r.get("scored")]
    loops = [r for r in rows if len(r["prediction_normalized"].split()) > 2 * r["words"] + 3]
    rest_words = sum(r["words"] for r in rows) - sum(r["words"] for r in loops)
    rest_errors = sum(r["errors"] for r in rows) - sum(r["errors"] for r in loops)
    return {"runaway_clips": len(loops), "runaway_errors": sum(r["errors"] for r in loops),
            "wer_without_runaways": 100 * rest_errors / rest_words if rest_words else None}
