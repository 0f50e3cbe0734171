#!/usr/bin/env python3
"""The one prepared GPU check: what only a GPU shows (bf16, NCCL, kernels, memory, throughput), in one run of at
most 8 minutes on one H100/H200. `bench/gpu_check.sh` runs it (its header says how, on the lent device machine).

Parts, in this order, each written to the results JSON as soon as it ends (a timeout still leaves figures):

- build: a random Whisper of large-v3's shape (d_model 1280, 32+32 layers, 20 heads, 128 mel bins, 51866
  vocabulary rows) written by `launcher.tiny_model.build_tiny_whisper`, made on the GPU in bf16 (half the bytes
  to write and to load; training loads it in fp32 as any checkpoint), and 128-mel shards of the bundled corpus.
- zero2, zero3: the real `deepspeed --num_gpus N train_ds.py --recipe <the demo recipe> --set ...` for 20 bf16
  steps under ZeRO-2, then ZeRO-3, batch 8, evaluating validation every 10 steps (its 8 clips in batches of 5
  and 3, 32 new tokens each, decoded on the GPU from the plain copy `launcher.model.materialize` gathers: the ZeRO-3
  gather-and-copy path; with several GPUs the ranks' slices are uneven too), with a checkpoint at each evaluation
  (~22 GB each at this size: the scratch folder goes to /dev/shm when it has room) and the final export. Read back:
  samples/s and tokens/s per logged window (train_log.jsonl), the pauses for evaluating and saving, the losses, the
  evaluation reports, peak GPU memory (nvidia-smi every 0.5 s: the run's whole use, CUDA context and allocator
  cache included), peak RSS of its processes, and an MFU estimate: the later windows' samples/s x bench/flops.py's
  training FLOPs per sample at the run's mean label length.
- throughput: bench/train_throughput.py --size large-v3 --batch 8 (this project's `train_step` in one process against
  the event's Seq2SeqTrainer + CPU-offloaded ZeRO-2, fp16): samples/s, MFU, torch.cuda.max_memory_allocated,
  speed-up. It runs without the baseline when too little of `--budget` is left for it; stopped at the budget's end,
  it still leaves the project's figures.

`--cpu` runs the same flow with a tiny model (d_model 64, 2+2 layers, the same vocabulary rows), fp32, 3 steps,
2 ranks on gloo (so the evaluation's slices are uneven: 3 and 2 clips), in a couple of minutes: it checks the
script end to end, not the figures. Results: bench/results/gpu_check.json (--cpu: gpu_check_cpu.json) or --out;
`--mirror DIR` copies it and the log there after every part (the device machine's $OUT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

from launcher.assets import DEMO_CORPUS, DEMO_RECIPE
from launcher.testing import flops as flop_count
from launcher.testing.commands import REPO
from launcher.testing.env import free_port, rank_env
from launcher.testing.flops import H100_DENSE_16BIT_TFLOPS

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Profile:
    model: str
    d_model: int
    layers: int
    heads: int
    precision: str
    steps: int
    eval_every: int
    eval_samples: int
    eval_batch: int
    max_new_tokens: int
    batch: int
    workers: int
    log_every: int
    throughput: tuple[str, ...]  # bench/train_throughput.py's arguments
    budget_s: float
    n_mels: int = 128
    vocab_rows: int = 51866  # large-v3's embedding and output rows
    lr: float = 1e-5


GPU = Profile("large-v3", 1280, 32, 20, "bf16", steps=20, eval_every=10, eval_samples=8, eval_batch=5,
              max_new_tokens=32, batch=8, workers=2, log_every=5, budget_s=450,
              throughput=("--size", "large-v3", "--batch", "8", "--steps", "5", "--warmup-steps", "2",
                          "--set", "optim.lr=1e-5"))
CPU = Profile("tiny", 64, 2, 4, "fp32", steps=3, eval_every=2, eval_samples=5, eval_batch=2, max_new_tokens=8,
              batch=4, workers=1, log_every=1, budget_s=600,
              throughput=("--size", "tiny", "--steps", "1", "--warmup-steps", "1"))
# seconds: the most a part may take, and the least left of the budget for it to start
CAPS = {"build": 150, "zero2": 210, "zero3": 240}
MIN_START = {"build": 30, "zero2": 60, "zero3": 60, "throughput": 60}
BASELINE_NEEDS_S = 200  # train_throughput with the event's baseline (CPU Adam built on first use) on large-v3


# ---- helpers -----------------------------------------------------------------------------------------------------

def gpu_query(fields: str) -> list[list[str]] | None:
    """nvidia-smi's answer, one row per GPU, or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[v.strip() for v in line.split(",")] for line in out.strip().splitlines()] or None


def gpu_used_mib() -> float | None:
    rows = gpu_query("memory.used")
    return sum(float(r[0]) for r in rows) if rows else None


class PeakMemory(threading.Thread):
    """Samples, every `every` s while a part runs, the GPUs' used memory (nvidia-smi) and the summed RSS of the
    part's processes (psutil), keeping the peaks."""

    def __init__(self, pid: int, gpu: bool, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.gpu, self.every = pid, gpu, every
        self.gpu_before = gpu_used_mib() if gpu else None
        self.gpu_peak: float | None = None
        self.rss_peak: float | None = None
        self._done = threading.Event()

    def _rss_mib(self) -> float | None:
        try:
            import psutil

            root = psutil.Process(self.pid)
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            return total / 2**20
        except Exception:  # noqa: BLE001 - no psutil, or the process is gone: no figure, no failure
            return None

    def run(self) -> None:
        while not self._done.wait(self.every):
            rss = self._rss_mib()
            if rss is not None:
                self.rss_peak = max(self.rss_peak or 0.0, rss)
            used = gpu_used_mib() if self.gpu else None
            if used is not None:
                self.gpu_peak = max(self.gpu_peak or 0.0, used)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return {"peak_gpu_memory_gib": self.gpu_peak / 1024 if self.gpu_peak is not None else None,
                "gpu_memory_before_gib": self.gpu_before / 1024 if self.gpu_before is not None else None,
                "peak_rss_gib": self.rss_peak / 1024 if self.rss_peak is not None else None}


def run_logged(cmd: list[str], env: dict, timeout: float, log: Path, gpu: bool) -> dict:
    """Run `cmd` in its own process group, its output appended to `log`; on timeout the whole group is ended."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        offset = f.tell()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        memory = PeakMemory(proc.pid, gpu)
        memory.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        wall = time.perf_counter() - start
        peaks = memory.stop()
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        tail = f.read().splitlines()[-40:]
    return {"command": shlex.join(cmd), "rc": proc.returncode, "timed_out": timed_out, "wall_s": wall, **peaks,
            "log_tail": tail}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- parts -------------------------------------------------------------------------------------------------------

def build(profile: Profile, work: Path, gpu: bool) -> dict:
    """In its own process (its GPU memory goes back when it ends): the model folder and the shards."""
    import torch
    from safetensors import safe_open

    from launcher.shards.build import ShardSettings, shard_corpus
    from launcher.sources.common_voice import CommonVoiceRelease
    from launcher.tiny_model import build_tiny_whisper

    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # weights made, and saved, in bf16
    try:
        with torch.device("cuda" if gpu else "cpu"):  # large-v3's 1.5 G weights initialise in seconds on a GPU
            model = build_tiny_whisper(work / "model", n_mels=profile.n_mels, d_model=profile.d_model,
                                       layers=profile.layers, heads=profile.heads, model_vocab_size=profile.vocab_rows)
    finally:
        torch.set_default_dtype(previous)
    model_s = time.perf_counter() - start
    parameters = 0
    for file in model.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parameters += math.prod(f.get_slice(key).get_shape())
    start = time.perf_counter()
    index = shard_corpus(CommonVoiceRelease(DEMO_CORPUS, "fr"), work / "shards",
                         ShardSettings(profile.n_mels, 50_000_000, "fr"), workers=0)
    return {"model": str(model), "parameters": parameters, "model_bytes": folder_bytes(model),
            "model_dtype_on_disk": "bfloat16", "model_s": model_s, "shards_s": time.perf_counter() - start,
            "shard_samples": {s: v["samples"] for s, v in index["splits"].items()}}


def train_overrides(profile: Profile, work: Path, stage: int) -> list[str]:
    p = profile
    return [f"model.name_or_path={work / 'model'}", f"data.shards={work / 'shards'}",
            f"output_dir={work / f'zero{stage}'}", f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={p.precision}", "deepspeed.timeout_minutes=5",
            f"data.batch_size_per_gpu={p.batch}", f"data.num_workers={p.workers}",
            f"optim.max_steps={p.steps}", f"optim.warmup_steps={max(1, p.steps // 10)}", f"optim.lr={p.lr}",
            f"eval.every_steps={p.eval_every}", f"eval.max_samples={p.eval_samples}",
            f"eval.batch_size_per_gpu={p.eval_batch}", f"eval.max_new_tokens={p.max_new_tokens}",
            "eval.test_at_end=false",
            "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.keep_best=0",
            f"logging.every_steps={p.log_every}", "logging.tensorboard=false"]


def mfu_estimate(profile: Profile, samples_per_s: float, label_len: float, gpu: bool, ranks: int) -> dict:
    """MFU of the whole run (samples/s summed over its ranks, against the peak of all its GPUs)."""
    forward = flop_count.forward_flops(n_mels=profile.n_mels, d_model=profile.d_model, encoder_layers=profile.layers,
                                       decoder_layers=profile.layers, encoder_ffn=4 * profile.d_model,
                                       decoder_ffn=4 * profile.d_model, vocab=profile.vocab_rows,
                                       label_len=max(1, round(label_len)))
    tflops = samples_per_s * flop_count.training_flops(forward) / 1e12
    peak = H100_DENSE_16BIT_TFLOPS * ranks if gpu and profile.precision != "fp32" else None
    return {"label_len": label_len, "achieved_tflops": tflops, "peak_tflops": peak,
            "mfu": tflops / peak if peak else None}


def read_run(run_dir: Path, profile: Profile, ranks: int, gpu: bool) -> dict:
    """What a finished (or stopped) run left: its log windows, evaluation reports, checkpoint and export."""
    log_file = run_dir / "train_log.jsonl"
    lines = log_file.read_text(encoding="utf-8").splitlines() if log_file.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    windows = [{k: r.get(k) for k in ("step", "loss", "samples_per_s", "tokens_per_s", "window_s", "grad_norm",
                                      "skipped_nonfinite_steps")} for r in records]
    for w, before, r in zip(windows[1:], records, records[1:], strict=False):
        w["paused_s"] = r["time"] - before["time"] - r["window_s"]  # evaluation and checkpoint since the last log
    evals = []
    for path in sorted((run_dir / "eval").glob("validation-step-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        r = json.loads(path.read_text(encoding="utf-8"))
        evals.append({k: r.get(k) for k in ("step", "wer", "cer", "samples", "scored", "world_size", "seconds",
                                            "samples_per_s", "audio_seconds")})
    later = windows[1:] or windows  # the first window holds the warm-up (kernels, allocator, loader start)
    seconds = sum(w["window_s"] for w in later)
    samples = sum(w["samples_per_s"] * w["window_s"] for w in later)
    tokens = sum(w["tokens_per_s"] * w["window_s"] for w in later)
    sps = samples / seconds if seconds else None
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    expected_evals = sorted({*range(profile.eval_every, profile.steps + 1, profile.eval_every), profile.steps})
    checks = {
        "steps_logged": bool(windows) and windows[-1]["step"] == profile.steps,
        "losses_finite": bool(windows) and all(w["loss"] is not None and w["loss"] == w["loss"] for w in windows),
        "evaluated_at": [e["step"] for e in evals] == expected_evals,
        "every_clip_scored": all(e["samples"] == profile.eval_samples for e in evals) and bool(evals),
        "world_size": all(e["world_size"] == ranks for e in evals) and bool(evals),
        "final_exported": (run_dir / "final" / "config.json").is_file(),
    }
    return {"checks": checks, "samples_per_s": sps, "tokens_per_s": tokens / seconds if seconds else None,
            "samples_per_s_windows_from_step": later[0]["step"] if later else None,
            "mfu_estimate": mfu_estimate(profile, sps, tokens / samples, gpu, ranks) if sps else None,
            "loss_first_last": [windows[0]["loss"], windows[-1]["loss"]] if windows else None,
            "windows": windows, "evaluations": evals, "checkpoints": checkpoints,
            "checkpoint_bytes": folder_bytes(run_dir / "checkpoints" / checkpoints[-1]) if checkpoints else None}


def train_run(profile: Profile, work: Path, stage: int, ranks: int, env: dict, timeout: float, log: Path,
              gpu: bool, keep: bool) -> dict:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--log_level", "error", "train_ds.py", "--recipe", str(DEMO_RECIPE),
           "--set", *train_overrides(profile, work, stage)]
    ran = run_logged(cmd, env, timeout, log, gpu)
    run_dir = work / f"zero{stage}"
    result = {**read_run(run_dir, profile, ranks, gpu), **ran}
    result["ok"] = ran["rc"] == 0 and all(result["checks"].values())
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)  # large-v3's checkpoints are ~22 GB each
    return result


def throughput(profile: Profile, work: Path, env: dict, timeout: float, log: Path, gpu: bool) -> dict:
    out = work / "train_throughput.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), *profile.throughput, "--out", str(out)]
    with_baseline = timeout >= BASELINE_NEEDS_S or not gpu
    if not with_baseline:
        cmd.append("--no-baseline")
    ran = run_logged(cmd, env, timeout, log, gpu)
    result = json.loads(out.read_text()) if out.is_file() else None  # the project's figures come first
    sides = {}
    for side in ("project", "baseline"):
        r = (result or {}).get(side)
        sides[side] = r and {k: r.get(k) for k in (
            "samples_per_s", "tokens_per_s", "audio_hours_per_hour", "achieved_tflops", "mfu", "median_step_s",
            "peak_memory_gib", "batch_per_step", "precision", "zero_stage", "skipped_steps", "what_ran")}
    ok = ran["rc"] == 0 and result is not None and (sides["baseline"] is not None or not with_baseline)
    return {"ok": ok, **sides, "with_baseline": with_baseline,
            "speedup_samples_per_s": (result or {}).get("speedup_samples_per_s"),
            "notes": (result or {}).get("notes"), "train_throughput": result, **ran}


# ---- the run -----------------------------------------------------------------------------------------------------

def device_info(gpu: bool) -> dict:
    import torch

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    rows = gpu_query("name,memory.total,driver_version") if gpu else None
    return {"gpus": [{"name": r[0], "memory_gib": float(r[1]) / 1024, "driver": r[2]} for r in rows or []],
            "device": rows[0][0] if rows else f"CPU ({platform.processor() or platform.machine()}, "
                                              f"{os.cpu_count()} cores)",
            "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": version("deepspeed"), "transformers": version("transformers")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model, fp32, 2 CPU ranks (DS_ACCELERATOR=cpu)")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/gpu_check.json, "
                                             "--cpu: gpu_check_cpu.json)")
    ap.add_argument("--mirror", type=Path, help="also copy the JSON and the log here after every part")
    ap.add_argument("--ranks", type=int, help="training ranks (default: every GPU; 2 with --cpu)")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default 450; 600 with --cpu)")
    ap.add_argument("--work", type=Path, help="where to make the scratch folder (default: /dev/shm when it has room "
                                              "for large-v3's checkpoints, else the temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (model, shards, runs)")
    ap.add_argument("--part", choices=("build",), help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = not args.cpu
    profile = CPU if args.cpu else GPU
    if args.part == "build":
        (args.work / "build.json").write_text(json.dumps(build(profile, args.work, gpu)))
        return 0

    started = time.perf_counter()
    budget = profile.budget_s if args.budget is None else args.budget
    if gpu and not gpu_query("name"):
        ap.error("no GPU found (nvidia-smi): run with --cpu for the CPU check")
    ranks = args.ranks or (len(gpu_query("name")) if gpu else 2)
    out = args.out or RESULTS / ("gpu_check.json" if gpu else "gpu_check_cpu.json")
    # a checkpoint holds bf16 weights, fp32 master weights and Adam's two moments: 14 bytes per weight; a save
    # writes the new one before it prunes the old, beside the model folder and the final export
    need = (2 * 14 + 2 * 2) * 1.55e9 + 8e9 if gpu else 1e9
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work or ("/dev/shm" if shm_free > need else None)))
    notes = []
    if shutil.disk_usage(work).free < need:  # one checkpoint, not two: evaluate at the end only
        profile = replace(profile, eval_every=profile.steps)
        notes.append(f"{work} has {shutil.disk_usage(work).free / 1e9:.0f} GB free, less than the {need / 1e9:.0f} "
                     f"GB two checkpoints need: evaluating (and saving) at step {profile.steps} only")
    log = work / "gpu_check.log"
    env = rank_env(gpu)
    results = {"benchmark": "gpu_check", "mode": "gpu" if gpu else "cpu", "date": time.strftime("%Y-%m-%d %H:%M"),
               **device_info(gpu), "ranks": ranks, "profile": asdict(profile), "budget_s": budget,
               "work": str(work), "notes": notes, "parts": {}, "complete": False}

    def save() -> None:
        results["wall_s"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        if args.mirror:
            args.mirror.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, args.mirror / out.name)
            if log.is_file():
                shutil.copy(log, args.mirror / log.name)

    def part(name: str, fn) -> None:
        left = budget - (time.perf_counter() - started)
        if left < MIN_START[name]:
            results["parts"][name] = {"ok": False, "skipped": f"{max(left, 0):.0f} s of the {budget:.0f} s budget left"}
        else:
            print(f"[gpu_check] {name} (up to {min(left, CAPS.get(name, left)):.0f} s) ...", flush=True)
            try:
                results["parts"][name] = fn(min(left, CAPS.get(name, left)))
            except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' figures
                results["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        r = results["parts"][name]
        print(f"[gpu_check] {name}: {status(r)}"
              + (f" in {r['wall_s']:.0f} s" if "wall_s" in r else "")
              + (f" ({r.get('skipped') or r.get('error')})" if "skipped" in r or "error" in r else ""), flush=True)
        save()

    def build_part(timeout: float) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "build", "--work", str(work)]
        ran = run_logged(cmd + (["--cpu"] if args.cpu else []), env, timeout, log, gpu)
        built = json.loads((work / "build.json").read_text()) if ran["rc"] == 0 else {}
        return {"ok": ran["rc"] == 0, **built, **ran}

    save()
    part("build", build_part)
    for stage in (2, 3):
        if results["parts"]["build"].get("ok"):
            part(f"zero{stage}", lambda timeout, stage=stage: train_run(profile, work, stage, ranks, env, timeout, log,
                                                                        gpu, args.keep))
        else:
            results["parts"][f"zero{stage}"] = {"ok": False, "skipped": "no model and shards (build did not end ok)"}
    part("throughput", lambda timeout: throughput(profile, work, env, timeout, log, gpu))
    results["complete"] = all(results["parts"].get(p, {}).get("ok") for p in ("build", "zero2", "zero3", "throughput"))
    results["summary"] = summary(results)
    save()
    print_summary(results, out)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results["complete"] else 1


def status(part: dict) -> str:
    return "ok" if part.get("ok") else "skipped" if "skipped" in part else "FAILED"


def summary(results: dict) -> dict:
    """The headline figures, one line each."""
    parts = results["parts"]
    out = {}
    for stage in ("zero2", "zero3"):
        r = parts.get(stage) or {}
        mfu = (r.get("mfu_estimate") or {}).get("mfu")
        out[stage] = {"samples_per_s": r.get("samples_per_s"), "mfu_estimate": mfu,
                      "peak_gpu_memory_gib": r.get("peak_gpu_memory_gib"), "peak_rss_gib": r.get("peak_rss_gib"),
                      "eval_seconds": [e["seconds"] for e in r.get("evaluations") or []], "wall_s": r.get("wall_s")}
    t = parts.get("throughput") or {}
    out["throughput"] = {side: t.get(side) and {k: t[side][k] for k in ("samples_per_s", "mfu", "peak_memory_gib")}
                         for side in ("project", "baseline")}
    out["throughput"]["speedup_samples_per_s"] = t.get("speedup_samples_per_s")
    return out


def print_summary(results: dict, out: Path) -> None:
    def fmt(x, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    s = results["summary"]
    print(f"{results['device']}, {results['ranks']} rank(s), Whisper {results['profile']['model']} shape, "
          f"{results['profile']['precision']}; {results['wall_s']:.0f} s")
    for name, r in results["parts"].items():
        print(f"  {name:<11}{status(r):<8}{fmt(r.get('wall_s'), '.0f'):>5} s"
              + (f"  {r.get('skipped') or r.get('error')}" if r.get("skipped") or r.get("error") else ""))
    for stage in ("zero2", "zero3"):
        r = s[stage]
        if r["wall_s"] is None:
            continue
        print(f"  {stage}: {fmt(r['samples_per_s'])} samples/s, MFU ~{fmt(r['mfu_estimate'], '.1%')}, peak GPU "
              f"{fmt(r['peak_gpu_memory_gib'], '.1f')} GiB, peak RSS {fmt(r['peak_rss_gib'], '.1f')} GiB, evaluations "
              f"{', '.join(fmt(x, '.1f') for x in r['eval_seconds'])} s")
    t = s["throughput"]
    for side in ("project", "baseline"):
        if t[side]:
            print(f"  train_throughput {side}: {fmt(t[side]['samples_per_s'])} samples/s, MFU "
                  f"{fmt(t[side]['mfu'], '.1%')}, peak {fmt(t[side]['peak_memory_gib'], '.1f')} GiB")
    if t["speedup_samples_per_s"] is not None:
        print(f"  speed-up vs the event's baseline: {t['speedup_samples_per_s']:.2f}x")
    print(f"saved {out}")


if __name__ == "__main__":
    sys.exit(main())
