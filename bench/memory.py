#!/usr/bin/env python3
"""Memory: `launcher.recipe.memory_estimate` against the measured peak of real training runs.

For each configuration the project's real training runs for a handful of steps, exactly as a user starts it:

    deepspeed --num_gpus 1 --master_port PORT --log_level error train_ds.py --recipe recipes/tiny_demo.yaml --set ...

(`DS_ACCELERATOR=cpu OMP_NUM_THREADS=1` without a GPU; fp32, `data.num_workers=1`, no evaluation, 10 steps). The
rank process (the one started with `--local_rank`) and, apart, its loader workers are sampled with psutil every
50 ms: peak RSS of the rank, peak RSS of the workers (it counts the pages a forked worker shares with the rank, so it
overstates what a worker adds) and, every ~1 s, the workers' USS (their own pages: what they add). The peak is taken
over the training steps, up to the moment the last step's line reaches train_log.jsonl; the end of the run (the
checkpoint saved at the last step, the export to final/) is reported apart. The estimate covers the rank process
(CPU) or one GPU; loader workers and the end-of-run save are not in it.

Then, in a fresh process of its own, the same recipe is run in-process by the library's own functions (as
launcher.train.train calls them: `load_model`, `deepspeed.initialize` with `deepspeed_config`, the real loader, and
`launcher.train.train_step`) to break the peak down: RSS after the imports, after the process group, after the
model is loaded, after `deepspeed.initialize`, and each step's peak per phase (forward, backward, optimizer step:
the engine instance's methods are wrapped to mark them, the library is not touched), as RSS and as glibc's bytes in
use (mallinfo2: the live allocations); plus the sizes DeepSpeed's ZeRO optimizer and Adam actually hold (flat
buffers, fp32 partition, moments), read off the engine. On a GPU the same breakdown reads
`torch.cuda.memory_allocated` / `max_memory_allocated` (the training loop does not report them), which is then the
measured figure compared with the estimate.

Configurations (`--configs`): real pretrained whisper-base (built once into bench/.cache/ by
bench/zero_shot_parity.py's `ensure_model`, from ../shared/tools/whisper_base_offline.py) with full fine-tuning,
with `model.freeze_encoder=true`, and with `model.gradient_checkpointing=true`, all at batch 8; on the CPU the same
three again with glibc's mmap threshold fixed at 1 MiB (`MALLOC_MMAP_THRESHOLD_=1048576`: freed tensors go back to
the system, so RSS follows the live bytes: the part of the peak that is glibc keeping freed heap shows as the
difference); the tiny random model (launcher.tiny_model) for `--quick`; on a GPU also whisper-base in bf16. Shards:
the bundled French corpus, sharded once into bench/.cache/ (launcher.testing.assets.shards). The estimate is given
the run's longest label batch (`label_tokens`, read from the breakdown's batches) and, for comparison, what
`launcher validate` shows (its defaults). Prints a table and saves bench/results/memory.json; `--rescore` compares
the saved measurements with the current `memory_estimate` without running anything.

    python bench/memory.py            # everything on the CPU: ~1 h on 2 cores, ~7 GB of RAM at peak
    python bench/memory.py --quick    # the tiny model only: ~1.5 min
    python bench/memory.py --rescore  # bench/results/memory.json against the current estimate: seconds
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from launcher.testing import assets
from launcher.testing.commands import REPO, deepspeed_cmd
from launcher.testing.env import free_port, rank_env, world_of_one

CACHE = assets.BENCH_CACHE
RESULTS = REPO / "bench" / "results" / "memory.json"
RECIPE = REPO / "recipes" / "tiny_demo.yaml"
GIB = 2**30
STEPS = 10
COMMON = [f"optim.max_steps={STEPS}", "optim.warmup_steps=1", "eval.every_steps=0", "checkpoint.keep_best=0",
          "checkpoint.every_steps=0", "eval.test_at_end=false", "logging.every_steps=5", "deepspeed.precision=fp32",
          "data.num_workers=1", "data.batch_size_per_gpu=8"]


@dataclass(frozen=True)
class Config:
    name: str
    model: str  # "base" (pretrained whisper-base) or "tiny" (launcher.tiny_model)
    sets: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # for the training processes
    on: str = "any"  # "gpu", "cpu" or "any"


# glibc keeps what it frees on its heap (allocations under its mmap threshold, which grows up to 32 MiB as large
# blocks are freed), so a CPU rank's RSS runs above its live bytes; a fixed 1 MiB threshold gives every tensor of
# 1 MiB or more its own mapping, returned when freed (`man mallopt`, M_MMAP_THRESHOLD)
MMAP_1MIB = (("MALLOC_MMAP_THRESHOLD_", str(2**20)),)
CONFIGS = [
    Config("tiny", "tiny"),
    Config("base", "base", ("optim.lr=1e-5",)),
    Config("base-frozen-encoder", "base", ("optim.lr=1e-5", "model.freeze_encoder=true")),
    Config("base-checkpointing", "base", ("optim.lr=1e-5", "model.gradient_checkpointing=true")),
    Config("base mmap-1MiB", "base", ("optim.lr=1e-5",), MMAP_1MIB, on="cpu"),
    Config("base-frozen-encoder mmap-1MiB", "base", ("optim.lr=1e-5", "model.freeze_encoder=true"), MMAP_1MIB,
           on="cpu"),
    Config("base-checkpointing mmap-1MiB", "base", ("optim.lr=1e-5", "model.gradient_checkpointing=true"), MMAP_1MIB,
           on="cpu"),
    Config("base-bf16", "base", ("optim.lr=1e-5", "deepspeed.precision=bf16"), on="gpu"),
]


# ---- inputs ------------------------------------------------------------------------------------------------------

def overrides(config: Config, model: Path, shards: Path, run_dir: Path) -> list[str]:
    return [f"model.name_or_path={model}", f"data.shards={shards}", f"output_dir={run_dir}", *COMMON, *config.sets]


def child_env(gpu: bool, config: Config) -> dict:
    return rank_env(gpu, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **dict(config.env))


def rss(p) -> int:
    return p.memory_info().rss


# ---- the run as a user starts it: peak RSS sampled from outside ---------------------------------------------------

def _rank_process(launcher):
    """The process started with --local_rank (not a loader worker forked from it, whose command line is the same)."""
    import psutil

    try:
        for p in launcher.children(recursive=True):
            try:
                if "--local_rank" in " ".join(p.cmdline()) and "--local_rank" not in " ".join(p.parent().cmdline()):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    except psutil.NoSuchProcess:
        pass
    return None


def _last_step_logged(log: Path, max_steps: int, seen: list[int]) -> bool:
    """Whether train_log.jsonl holds the last step's record (read again only when the file grew)."""
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        return False
    if size == seen[0]:
        return False
    seen[0] = size
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step") == max_steps:
                return True
        except ValueError:
            continue
    return False


def measure_cli(argv: list[str], env: dict, run_dir: Path, interval: float = 0.05) -> dict:
    """Run `argv` (a deepspeed command line) and sample its rank process and the rank's loader workers."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=60)
    reader = threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True)
    reader.start()
    launcher = psutil.Process(proc.pid)
    peaks = {"steps": {"rank_rss": 0, "workers_rss": 0, "workers_uss": 0, "rank_plus_workers_rss": 0},
             "end": {"rank_rss": 0, "workers_rss": 0, "workers_uss": 0, "rank_plus_workers_rss": 0}}
    phase, seen, n, rank, peak_at, samples, at_loader = "steps", [-1], 0, None, 0.0, 0, None
    first_seen: dict[int, tuple[int, int]] = {}  # pid -> (sample, the rank's RSS then)
    log = run_dir / "train_log.jsonl"
    while proc.poll() is None:
        n += 1
        if rank is None or not rank.is_running():
            rank = _rank_process(launcher)
            rank_cmdline = rank.cmdline() if rank is not None else None
        if phase == "steps" and n % 4 == 0 and _last_step_logged(log, STEPS, seen):
            phase = "end"
        if rank is not None:
            try:
                r = rss(rank)
                # loader workers are forked, so they have the rank's command line, and they last: a child that
                # execs a program (a compiler test) has it too, for an instant between fork and exec
                forked = [c for c in rank.children(recursive=True) if c.cmdline() == rank_cmdline]
                for c in forked:
                    first_seen.setdefault(c.pid, (n, r))
                workers = [c for c in forked if n - first_seen[c.pid][0] >= 3]
                if workers and at_loader is None:  # the loader starts right before the first step
                    at_loader = first_seen[workers[0].pid][1]
                w = sum(rss(c) for c in workers)
                uss = sum(c.memory_full_info().uss for c in workers) if n % 20 == 0 else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                r = w = uss = 0
            pk = peaks[phase]
            if r > pk["rank_rss"]:
                pk["rank_rss"] = r
                if phase == "steps":
                    peak_at = time.perf_counter() - started
            pk["workers_rss"] = max(pk["workers_rss"], w)
            pk["workers_uss"] = max(pk["workers_uss"], uss)
            pk["rank_plus_workers_rss"] = max(pk["rank_plus_workers_rss"], r + w)
            samples += 1
        time.sleep(interval)
    reader.join(timeout=5)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training exited {proc.returncode}:\n" + "".join(tail))
    if phase != "end":
        raise RuntimeError("the last step's record never reached train_log.jsonl:\n" + "".join(tail))
    return {"seconds": seconds, "samples": samples, "interval_s": interval, "steps_peak_at_s": peak_at,
            "rank_rss_when_the_loader_started": at_loader,
            "peak_bytes": peaks, "train_log": [json.loads(x) for x in log.read_text().splitlines()]}


# ---- the same recipe in-process: where the memory goes ------------------------------------------------------------

def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (arenas in use + mmapped chunks): the process's live
    allocations, tensors included. None where mallinfo2 is missing (not glibc >= 2.33)."""
    global _MALLINFO2
    if _MALLINFO2 is None:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
        try:
            fn = ctypes.CDLL("libc.so.6").mallinfo2
            fn.restype = MallInfo2
            _MALLINFO2 = fn
        except (OSError, AttributeError):
            _MALLINFO2 = False
    if not _MALLINFO2:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


_MALLINFO2 = None


class PeakSampler:
    """This process's RSS and malloc's bytes in use, sampled every `interval` s in a thread (torch's kernels
    release the GIL); peaks kept per phase."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        r, live = rss(self.proc), malloc_in_use() or 0
        peak = self.peaks.setdefault(self.phase, {"rss": 0, "malloc_in_use": 0})
        peak["rss"], peak["malloc_in_use"] = max(peak["rss"], r), max(peak["malloc_in_use"], live)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()
        self.phase = phase
        self._sample()

    def take(self) -> dict:
        """The peaks per phase since the last take, then start again."""
        self._sample()
        peaks, self.peaks = self.peaks, {}
        return peaks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def watch_phases(engine, sampler: PeakSampler) -> None:
    """Mark forward, backward and optimizer step on this engine instance (its methods wrapped, the library not
    touched), so that each step's peaks are kept per phase."""
    for name in ("forward", "backward", "step"):
        method = getattr(engine, name)

        def wrapped(*a, _method=method, _name=name, **kw):
            sampler.enter(_name)
            try:
                return _method(*a, **kw)
            finally:
                sampler.enter(f"after {_name}")
        setattr(engine, name, wrapped)


def _numel(t) -> int:
    return int(t.numel()) if t is not None and hasattr(t, "numel") else 0


def deepspeed_buffers(engine) -> dict:
    """Elements held by DeepSpeed's ZeRO optimizer and the wrapped Adam, read off the engine (ZeRO-2 and -3)."""
    opt = engine.optimizer
    out = {"zero_optimizer": type(opt).__name__, "inner_optimizer": type(getattr(opt, "optimizer", None)).__name__}
    named = {
        "flat_model_weights": getattr(opt, "bit16_groups_flat", None),  # ZeRO-2: the model's weights, flattened
        "fp32_partition": getattr(opt, "single_partition_of_fp32_groups", None)
                          or getattr(opt, "fp32_partitioned_groups_flat", None),
    }
    for key, tensors in named.items():
        if tensors is not None:
            out[key] = {"elements": sum(_numel(t) for t in tensors),
                        "dtype": str(tensors[0].dtype) if len(tensors) else None}
    grads = getattr(opt, "grads_in_partition", None)
    if grads is not None:
        out["grads_in_partition"] = {"elements": _numel(grads), "dtype": str(grads.dtype)}
    for bucket_dtype, bucket in (getattr(opt, "ipg_buckets", None) or {}).items():
        held = getattr(bucket, "buffer", None) or []
        out[f"ipg_bucket_{bucket_dtype}"] = {"elements": sum(_numel(t) for t in held)}
    inner = getattr(opt, "optimizer", None)
    if inner is not None:
        moments = [t for state in inner.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
        out["adam_moments"] = {"elements": sum(_numel(t) for t in moments),
                               "dtype": str(moments[0].dtype) if moments else None}
    return out


def run_breakdown(args) -> dict:
    """In-process phases of one configuration (a fresh process: imports are measured from the start)."""
    import psutil

    me = psutil.Process()
    marks = {"start": rss(me)}
    import deepspeed
    import torch
    import transformers  # noqa: F401 - part of the baseline, as in launcher.train

    from launcher.data.labels import LabelEncoder
    from launcher.data.loader import train_loader
    from launcher.data.mixing import train_shards
    from launcher.data.stream import ShardStream, StreamSettings
    from launcher.model import DTYPES, load_model
    from launcher.recipe.checks import check_against_data_and_model
    from launcher.recipe.ds_config import deepspeed_config
    from launcher.recipe.load import load_recipe
    from launcher.training.step import train_step

    marks["imports"] = rss(me)
    imports_live = malloc_in_use()
    gpu, device = world_of_one()
    recipe = load_recipe(RECIPE, args.overrides)
    [data_set], model_config = check_against_data_and_model(recipe)  # one shard set
    marks["process_group"] = rss(me)
    torch.manual_seed(recipe.seed)
    gpu_marks = {}

    def gpu_mark(name: str) -> None:
        if gpu:
            torch.cuda.synchronize()
            gpu_marks[name] = torch.cuda.memory_allocated()

    model, processor = load_model(recipe)
    if gpu:
        model.to(device)
    marks["model_loaded"] = rss(me)
    gpu_mark("model_loaded")
    ds_config = deepspeed_config(recipe, 1, on_gpu=gpu, d_model=model_config.get("d_model"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    del model, trainable
    marks["engine"] = rss(me)
    gpu_mark("engine")
    labels = LabelEncoder(processor.tokenizer, data_set.language, recipe.model.task,
                          normalize=recipe.data.target_text == "normalized")
    stream = ShardStream(train_shards(data_set.index, recipe.data.train_split), labels,
                         StreamSettings.from_recipe(recipe), rank=0, world_size=1)
    batches = iter(train_loader(stream, recipe.data.num_workers, pin_memory=gpu))
    dtype = DTYPES[recipe.deepspeed.precision]
    sampler = PeakSampler()
    marks["loader_started"] = rss(me)
    live = {"imports": imports_live, "engine": malloc_in_use()}
    watch_phases(engine, sampler)
    steps = []
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        engine.train()
        result = train_step(engine, batches, recipe.optim.grad_accum, device, dtype)
        phases = sampler.take()
        row = {"step": step, "seconds": time.perf_counter() - started,
               "peak_rss": max(p["rss"] for p in phases.values()), "end_rss": rss(me),
               "peak_malloc_in_use": max(p["malloc_in_use"] for p in phases.values()),
               "end_malloc_in_use": malloc_in_use(), "phases": phases,
               "label_tokens": max(int(b["labels"].shape[1]) for b in result.batches),
               "loss": float(result.losses[-1])}
        if gpu:
            torch.cuda.synchronize()
            row["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
            row["gpu_end_allocated"] = torch.cuda.memory_allocated()
        steps.append(row)
    sampler.stop()
    out = {"marks_rss": marks, "marks_malloc_in_use": live, "steps": steps, "deepspeed": deepspeed_buffers(engine),
           "parameters": sum(p.numel() for p in engine.module.parameters()),
           "trainable": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
           "model_config": model_config, "ds_config": ds_config, "gpu": gpu}
    if gpu:
        out["gpu_marks_allocated"] = gpu_marks
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def breakdown_in_subprocess(config_overrides: list[str], env: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "breakdown.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "breakdown", "--part-out", str(out),
               "--steps", str(steps), "--set", *config_overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"breakdown exited {proc.returncode}:\n" + "\n".join(proc.stdout.splitlines()[-40:]))
        return json.loads(out.read_text())


# ---- the estimate -------------------------------------------------------------------------------------------------

def estimate(recipe, model_config: dict, *, gpu: bool, label_tokens: int | None) -> dict:
    """`memory_estimate` for one rank, given what this version of it accepts (the keyword-only `on_gpu` and
    `label_tokens` came later than the function; this bench also ran against the version before them)."""
    from launcher.recipe.memory import memory_estimate

    accepted = inspect.signature(memory_estimate).parameters
    kwargs = {}
    if "on_gpu" in accepted:
        kwargs["on_gpu"] = gpu
    if "label_tokens" in accepted and label_tokens is not None:
        kwargs["label_tokens"] = label_tokens
    return {"kwargs": kwargs, **memory_estimate(recipe, model_config, 1, **kwargs)}


def components(b: dict) -> dict:
    """The measured breakdown in GiB: RSS at each mark, what each phase added, and the step peaks (RSS and live
    malloc bytes, per phase of the step that peaked)."""
    m, live = b["marks_rss"], b.get("marks_malloc_in_use", {})
    steps = b["steps"]
    peak = max(steps, key=lambda s: s["peak_rss"])
    before = steps[peak["step"] - 2]["end_rss"] if peak["step"] > 1 else m["engine"]
    out = {"rss at start": m["start"] / GIB, "rss after imports": m["imports"] / GIB,
           "rss after process group + recipe": m["process_group"] / GIB,
           "model load (weights, processor)": (m["model_loaded"] - m["process_group"]) / GIB,
           "deepspeed.initialize": (m["engine"] - m["model_loaded"]) / GIB,
           "rss after deepspeed.initialize": m["engine"] / GIB,
           "rss after step 1": steps[0]["end_rss"] / GIB,
           "peak step": peak["step"], "rss peak in steps": peak["peak_rss"] / GIB,
           "rss peak over the step's start": (peak["peak_rss"] - before) / GIB}
    if peak.get("peak_malloc_in_use"):
        out["malloc in use after imports"] = (live.get("imports") or 0) / GIB
        out["malloc in use after deepspeed.initialize"] = (live.get("engine") or 0) / GIB
        out["malloc in use at the step's end"] = peak["end_malloc_in_use"] / GIB
        out["malloc in use, peak in steps"] = max(s["peak_malloc_in_use"] for s in steps) / GIB
        out["rss peak minus malloc-in-use peak (same step)"] = (peak["peak_rss"] - peak["peak_malloc_in_use"]) / GIB
        for phase, pk in peak.get("phases", {}).items():
            out[f"step {peak['step']} {phase}: rss / malloc in use"] = f"{pk['rss'] / GIB:.2f} / " \
                                                                      f"{pk['malloc_in_use'] / GIB:.2f}"
    return out


# ---- orchestration ------------------------------------------------------------------------------------------------

def run_config(config: Config, model: Path, shards: Path, gpu: bool, breakdown_steps: int) -> dict:
    from launcher.recipe.checks import load_model_config
    from launcher.recipe.load import load_recipe

    env = child_env(gpu, config)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        run_dir = Path(tmp) / "run"
        sets = overrides(config, model, shards, run_dir)
        recipe = load_recipe(RECIPE, sets)
        model_config = load_model_config(str(model))
        started = time.perf_counter()
        b = breakdown_in_subprocess(overrides(config, model, shards, Path(tmp) / "breakdown-run"), env,
                                    breakdown_steps)
        breakdown_s = time.perf_counter() - started
        argv = deepspeed_cmd("--num_gpus", "1", "--master_port", str(free_port()), "--log_level", "error",
                             "train_ds.py", "--recipe", str(RECIPE), "--set", *sets)
        cli = measure_cli(argv, env, run_dir)
    row = {"config": config.name, "model": config.model, "overrides": [*COMMON, *config.sets], "env": dict(config.env),
           "recipe_overrides": sets,
           "command": "deepspeed " + " ".join(argv[1:]), "label_tokens_max": max(s["label_tokens"] for s in b["steps"]),
           "measured": {"what": ("torch.cuda.max_memory_allocated in the in-process run" if gpu else
                                 "peak RSS of the rank process over the training steps (deepspeed CLI run)"),
                        "gib": (b["gpu_peak_allocated"] if gpu else cli["peak_bytes"]["steps"]["rank_rss"]) / GIB},
           "cli": cli, "cli_seconds": cli["seconds"], "breakdown_seconds": breakdown_s,
           "breakdown": b, "breakdown_gib": components(b)}
    return score(row, recipe, model_config, gpu)


def score(row: dict, recipe, model_config: dict, gpu: bool) -> dict:
    """The estimate for the run's recipe, at the run's longest label batch and at validate's defaults."""
    est_run = estimate(recipe, model_config, gpu=gpu, label_tokens=row["label_tokens_max"])
    est_default = estimate(recipe, model_config, gpu=gpu, label_tokens=None)
    row.update(estimate_at_run_labels=est_run, estimate_validate_defaults=est_default,
               ratio_estimate_over_measured=est_run["total_gib"] / row["measured"]["gib"],
               ratio_validate_over_measured=est_default["total_gib"] / row["measured"]["gib"])
    return row


def rescore(path: Path) -> dict:
    """Saved measurements against the current `memory_estimate` (nothing is run again)."""
    from launcher.recipe.load import load_recipe

    result = json.loads(path.read_text())
    for row in result["runs"]:
        score(row, load_recipe(RECIPE, row["recipe_overrides"]), row["breakdown"]["model_config"],
              row["breakdown"]["gpu"])
    result["rescored"] = time.strftime("%Y-%m-%d %H:%M")
    return result


def print_table(rows: list[dict], gpu: bool) -> None:
    what = "GPU max_memory_allocated" if gpu else "rank peak RSS"
    print(f"\n{'config':<31}{'labels':>7}{'measured':>10}{'estimate':>10}{'ratio':>7}{'validate':>10}{'ratio':>7}"
          f"{'workers RSS':>13}{'workers USS':>13}{'at start':>10}{'end-of-run':>12}   (GiB; measured = {what})")
    for r in rows:
        pk = r["cli"]["peak_bytes"]
        print(f"{r['config']:<31}{r['label_tokens_max']:>7}{r['measured']['gib']:>10.2f}"
              f"{r['estimate_at_run_labels']['total_gib']:>10.2f}{r['ratio_estimate_over_measured']:>7.2f}"
              f"{r['estimate_validate_defaults']['total_gib']:>10.2f}{r['ratio_validate_over_measured']:>7.2f}"
              f"{pk['steps']['workers_rss'] / GIB:>13.2f}{pk['steps']['workers_uss'] / GIB:>13.2f}"
              f"{(r['cli'].get('rank_rss_when_the_loader_started') or 0) / GIB:>10.2f}"
              f"{pk['end']['rank_rss'] / GIB:>12.2f}")
    print("\nestimate components (GiB, at the run's label length):")
    keys = [k for k in rows[0]["estimate_at_run_labels"] if k.endswith("_gib")]
    print(f"{'config':<31}" + "".join(f"{k.removesuffix('_gib'):>14}" for k in keys))
    for r in rows:
        print(f"{r['config']:<31}" + "".join(f"{r['estimate_at_run_labels'][k]:>14.3f}" for k in keys))
    print("\nmeasured breakdown (in-process run, GiB):")
    for r in rows:
        print(f"  {r['config']}:")
        for k, v in r["breakdown_gib"].items():
            print(f"    {k:<48} {v:.3f}" if isinstance(v, float) else f"    {k:<48} {v}")


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model only (~1 min)")
    ap.add_argument("--configs", help=f"comma-separated, from: {', '.join(c.name for c in CONFIGS)}")
    ap.add_argument("--steps", type=int, default=4, help="steps of the in-process breakdown run (default 4)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rescore", action="store_true",
                    help="recompute the estimates of the saved --out against the current memory_estimate, run nothing")
    ap.add_argument("--part", choices=("breakdown",), help=argparse.SUPPRESS)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        args.part_out.write_text(json.dumps(run_breakdown(args)))
        return

    if args.rescore:
        result = rescore(args.out)
        write_result(result, args.out)
        print_table(result["runs"], result["runs"][0]["breakdown"]["gpu"])
        print(f"\nrescored {args.out}")
        return
    import torch

    gpu = torch.cuda.is_available()
    wanted = (["tiny"] if args.quick else args.configs.split(",") if args.configs
              else [c.name for c in CONFIGS if c.on in ("any", "gpu" if gpu else "cpu")])
    unknown = set(wanted) - {c.name for c in CONFIGS}
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    configs = sorted((c for c in CONFIGS if c.name in wanted), key=lambda c: wanted.index(c.name))  # as asked
    shards = assets.shards(CACHE / "demo-shards-80")  # the bundled French corpus, as the suite shards it
    models = {kind: assets.whisper_base() if kind == "base" else assets.tiny_whisper(CACHE / "tiny-whisper")
              for kind in {c.model for c in configs}}
    import deepspeed
    import psutil
    import transformers

    rows, started = [], time.perf_counter()
    result = {
        "benchmark": "memory", "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"device": torch.cuda.get_device_name(0) if gpu else "CPU",
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_gib": psutil.virtual_memory().total / GIB, "python": platform.python_version(),
                    "platform": platform.platform(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "transformers": transformers.__version__, "omp_num_threads": 1},
        "recipe": str(RECIPE.relative_to(REPO)), "steps": STEPS, "breakdown_steps": args.steps,
        "measured_covers": ("one GPU's torch.cuda.max_memory_allocated (no CUDA context, no allocator cache)" if gpu
                            else "the rank process's RSS; loader workers are reported apart and not estimated"),
        "runs": rows,
    }
    for c in configs:
        print(f"{c.name}: breakdown ({args.steps} steps in-process), then the deepspeed run ({STEPS} steps) ...",
              flush=True)
        rows.append(run_config(c, models[c.model], shards, gpu, args.steps))
        r = rows[-1]
        print(f"  measured {r['measured']['gib']:.2f} GiB, estimate {r['estimate_at_run_labels']['total_gib']:.2f} "
              f"GiB ({r['cli_seconds']:.0f} s + {r['breakdown_seconds']:.0f} s)", flush=True)
        result["seconds"] = time.perf_counter() - started
        write_result(result, args.out)  # after each configuration: a long run interrupted keeps what it measured
    write_result(result, args.out)
    print_table(rows, gpu)
    print(f"\n{time.perf_counter() - started:.0f} s; saved {args.out}")


if __name__ == "__main__":
    main()
