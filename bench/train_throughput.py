#!/usr/bin/env python3
"""Training throughput and MFU of this project's DeepSpeed step, against the event's Seq2SeqTrainer, in one run.

Model: a Whisper of the chosen size (`--size`, dimensions from SIZES below) with random weights built from
`WhisperConfig`: no download, and the speed of a step does not depend on the weights' values.

This project (`launcher.train.train_step`, one process, world size 1): the recipe (`--recipe`, default
recipes/tiny_demo.yaml, plus `--set` overrides and the options below) gives the DeepSpeed config through
`launcher.recipe.deepspeed_config` (torch's AdamW, fused on the GPU) and the model settings (attention, gradient
checkpointing, frozen encoder, SpecAugment) through `launcher.model.configure_for_training`, applied to the random
weights. Batches are what `launcher.data.collate` makes of shard samples (unpadded float16 log-mel of synthetic
audio of `--clip-seconds`, stacked to the batch's longest clip, not padded; random labels of `--label-len` tokens,
end of text included): a few are built before timing and reused, pinned on the GPU, because in training they come
from loader workers running beside the step (bench/loader_throughput.py measures that they keep up). Each step is
`launcher.train.train_step`, the one the training loop runs: per micro-batch, copy the stored frames to the device,
pad them there to Whisper's 3000 frames in the compute dtype (`launcher.features.pad_batch`), forward, backward,
DeepSpeed's step (which skips a step whose gradients are not finite).

The baseline (the Common Voice 11 event's approach): `transformers.Seq2SeqTrainer` with the event's DeepSpeed
config (ZeRO-2, optimizer offloaded to the CPU, fp16), same model, batch, gradient accumulation, gradient
checkpointing and label length, features computed on the fly from raw 16 kHz audio of `--clip-seconds` by
`WhisperFeatureExtractor` in the data collator, in the main process (the Trainer's default of 0 loader workers,
as in the event's script). Without a GPU: fp32, no offload. If DeepSpeed's CPU Adam cannot be built (it needs a
C++ compiler and DeepSpeed's sources), or Seq2SeqTrainer + DeepSpeed fails on the CPU, the fallback that ran is
printed and saved.

Both are timed from the end of the `--warmup-steps`-th step to the end of the last (`--steps` steps, each
including fetching its batch), with the device synchronised. Reported: samples/s, audio hours per hour
(samples/s x `--clip-seconds`), label tokens/s, achieved TFLOPS and MFU from the analytic count in
bench/flops.py (against `--peak-tflops`; default 989, H100/H200 dense bf16/fp16, on CUDA in 16-bit; n/a on the
CPU unless given), and peak GPU memory (torch.cuda.max_memory_allocated, reset once the engine is built).
Each side runs in its own subprocess, one after the other (on the CPU with one thread each, `--threads`: the CPU run
checks the script, the targets are for a GPU). Saves bench/results/train_throughput.json (`--out`): the project's
figures as soon as they are measured, then again with the baseline's.

    python bench/train_throughput.py                                 # tiny, CPU (1 thread, 2 steps): ~40 s
    python bench/train_throughput.py --size large-v3 --batch 16      # one H100: bf16, ZeRO-2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.testing import flops as flop_count
from launcher.testing.commands import REPO
from launcher.testing.env import rank_env, world_of_one, world_of_one_env
from launcher.testing.flops import H100_DENSE_16BIT_TFLOPS

# name: (n_mels, d_model, encoder + decoder layers each, attention heads, ffn, vocabulary)
SIZES = {
    "tiny": (80, 64, 2, 4, 256, 51865),  # the dimensions of launcher/tiny_model.py, with Whisper's vocabulary
    "base": (80, 512, 6, 8, 2048, 51865),
    "small": (80, 768, 12, 12, 3072, 51865),
    "medium": (80, 1024, 24, 16, 4096, 51865),
    "large-v3": (128, 1280, 32, 20, 5120, 51866),
}
EOT, SOT = 50257, 50258  # <|endoftext|>, <|startoftranscript|> in both multilingual vocabularies
SAMPLE_RATE = 16000

# The event's ds_config.json (huggingface/community-events, whisper-fine-tuning-event), "auto" filled by the Trainer.
EVENT_DS_CONFIG = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"last_batch_iteration": -1, "total_num_steps": "auto",
                                                      "warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def whisper_config(size: str):
    from transformers import WhisperConfig

    n_mels, d, layers, heads, ffn, vocab = SIZES[size]
    return WhisperConfig(vocab_size=vocab, num_mel_bins=n_mels, d_model=d, encoder_layers=layers,
                         decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                         encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_source_positions=1500,
                         max_target_positions=448, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
                         decoder_start_token_id=SOT, use_cache=False)


def synthetic_audio(seconds: float, rng) -> object:
    """Speech-like 16 kHz audio: a gliding harmonic voice, syllable-rate amplitude modulation, a little noise."""
    import numpy as np

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    x = 0.2 * voice * envelope + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def random_labels(label_len: int, rng) -> list[int]:
    """label_len ids: text tokens, then <|endoftext|> (the model prepends <|startoftranscript|> itself)."""
    return [int(i) for i in rng.integers(0, EOT, label_len - 1)] + [EOT]


def quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def peak_tflops(args, on_gpu: bool, precision: str) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    return H100_DENSE_16BIT_TFLOPS if on_gpu and precision in ("bf16", "fp16") else None


def optimizer_names(optimizer) -> str:
    """The optimizer and what it wraps, e.g. DeepSpeedZeroOptimizer(AdamW): shows what actually ran."""
    inner = getattr(optimizer, "optimizer", None)
    return type(optimizer).__name__ + (f"({optimizer_names(inner)})" if inner is not None else "")


# ---- this project ------------------------------------------------------------------------------------------------

def build_recipe(args):
    """The recipe with `--set` and then the benchmark's settings (batch, ZeRO stage, precision, steps; no evaluation
    or saving) applied."""
    from launcher.recipe.load import load_recipe

    base = load_recipe(args.recipe, args.overrides)
    total = args.warmup_steps + args.steps
    sets = [f"optim.max_steps={total}", f"optim.warmup_steps={min(base.optim.warmup_steps, total - 1)}",
            "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_best=0", "logging.every_steps=1",
            f"deepspeed.precision={args.precision}"]
    if args.batch:
        sets.append(f"data.batch_size_per_gpu={args.batch}")
    if args.zero_stage:
        sets.append(f"deepspeed.zero_stage={args.zero_stage}")
    return load_recipe(args.recipe, [*args.overrides, *sets])  # the benchmark's settings win


def random_model(recipe, config, device):
    """Random weights from `config`, configured for training as `launcher.model.load_model` configures a loaded
    model (`launcher.model.configure_for_training`)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from launcher.model import configure_for_training

    attention = recipe.model.attn_implementation
    with torch.device(device):  # initialising large-v3 on the GPU takes seconds, on the CPU a minute
        torch.manual_seed(recipe.seed)
        model = WhisperForConditionalGeneration._from_config(config, attn_implementation=attention, dtype=torch.float32)
    return configure_for_training(model, recipe.model)


def project_batches(recipe, config, args, n_batches: int, pin: bool) -> list[dict]:
    """Collated batches as the loader delivers them: launcher.data.collate over shard-like samples."""
    import numpy as np
    import torch

    from launcher.data.loader import collate
    from launcher.features import log_mel_spectrogram

    rng = np.random.default_rng(recipe.seed)
    batches = []
    for b in range(n_batches):
        samples = []
        for i in range(recipe.data.batch_size_per_gpu):
            mel = log_mel_spectrogram(synthetic_audio(args.clip_seconds, rng), config.num_mel_bins)
            samples.append({"ids": [f"synthetic-{b}-{i}"], "features": torch.from_numpy(mel.astype(np.float16)),
                            "labels": random_labels(args.label_len, rng), "prompt": [], "epoch": 0,
                            "positions": [(0, i)], "seconds": args.clip_seconds, "worker": 0, "dropped_long": 0,
                            "bad_data": 0})
        batch = collate(samples)
        if pin:  # as train_loader(pin_memory=True) delivers them
            batch.update({k: batch[k].pin_memory() for k in ("features", "frames", "pads", "labels")})
        batches.append(batch)
    return batches


def run_project(args) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from launcher.model import DTYPES
    from launcher.recipe.ds_config import deepspeed_config
    from launcher.training.step import train_step

    quiet_deepspeed()
    gpu, device = world_of_one()
    recipe = build_recipe(args)
    config = whisper_config(args.size)
    ds_config = deepspeed_config(recipe, 1, on_gpu=gpu, d_model=config.d_model)
    model = random_model(recipe, config, device)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    dtype = DTYPES[recipe.deepspeed.precision]
    accum = recipe.optim.grad_accum
    batches = itertools.cycle(project_batches(recipe, config, args, n_batches=2, pin=gpu))
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    ends, losses, samples, tokens = [], [], 0, 0
    engine.train()
    for step in range(args.warmup_steps + args.steps):
        result = train_step(engine, batches, accum, device, dtype)
        if step >= args.warmup_steps:
            samples += sum(len(b["ids"]) for b in result.batches)
            tokens += sum(int((b["labels"] != -100).sum()) for b in result.batches)
        losses.append(result.losses[-1])
        if gpu:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    timed = ends[args.warmup_steps - 1:]  # the end of the last warm-up step, then the end of each timed step
    seconds = timed[-1] - timed[0]
    losses = [float(loss) for loss in losses]
    result = {
        "what_ran": (f"launcher.train.train_step on deepspeed.initialize(config=launcher.recipe.deepspeed_config("
                     f"recipe)), ZeRO-{recipe.deepspeed.zero_stage}, {recipe.deepspeed.precision}, "
                     f"{'GPU' if gpu else 'CPU'}, batches from launcher.data.collate; optimizer "
                     f"{optimizer_names(optimizer)}"),
        "parameters": n_params, "batch_per_step": recipe.data.batch_size_per_gpu * accum,
        "micro_batch": recipe.data.batch_size_per_gpu, "grad_accum": accum,
        "precision": recipe.deepspeed.precision, "zero_stage": recipe.deepspeed.zero_stage,
        "gradient_checkpointing": recipe.model.gradient_checkpointing,
        "freeze_encoder": recipe.model.freeze_encoder, "attn_implementation": recipe.model.attn_implementation,
        "ds_config": ds_config, "steps_timed": args.steps, "seconds": seconds, "samples": samples,
        "tokens": tokens, "step_seconds": [b - a for a, b in zip(timed, timed[1:], strict=False)],
        "loss_first_last": [losses[0], losses[-1]], "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "device_name": torch.cuda.get_device_name(0) if gpu else None,  # here: the parent never touches the GPU
    }
    dist.destroy_process_group()
    return result


# ---- the event's baseline --------------------------------------------------------------------------------------

class EventCollator:
    """The event's DataCollatorSpeechSeq2SeqWithPadding, with the log-mel computed here from raw audio (the event's
    streaming script computed it in `prepare_dataset` as samples were read, in the same process)."""

    def __init__(self, extractor):
        self.extractor = extractor

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.extractor([f["audio"] for f in features], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        longest = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        if (labels[:, 0] == SOT).all():
            labels = labels[:, 1:]
        return {"input_features": batch["input_features"], "labels": labels}


def run_baseline(args, mode: str) -> dict:
    """mode: "deepspeed" (the event's config, offload as --baseline-offload says) or "plain" (no DeepSpeed)."""
    import numpy as np
    import torch
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    on_gpu = torch.cuda.is_available()
    world_of_one_env()  # the Trainer starts the process group itself
    config = whisper_config(args.size)
    recipe = build_recipe(args)
    batch, accum = recipe.data.batch_size_per_gpu, recipe.optim.grad_accum
    checkpointing = {"same": recipe.model.gradient_checkpointing, "on": True,
                     "off": False}[args.baseline_gradient_checkpointing]
    torch.manual_seed(recipe.seed)
    with torch.device("cuda" if on_gpu else "cpu"):  # the Trainer would move it there; initialising is faster there
        model = WhisperForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.forced_decoder_ids = None  # as the event's script
    model.config.suppress_tokens = []
    rng = np.random.default_rng(recipe.seed)
    pool = [{"audio": synthetic_audio(args.clip_seconds, rng), "labels": random_labels(args.label_len, rng)}
            for _ in range(min(64, batch * accum * (args.warmup_steps + args.steps)))]

    class Clips(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch * accum * (args.warmup_steps + args.steps)

        def __getitem__(self, i: int) -> dict:
            return pool[i % len(pool)]

    ds_config, what = None, "Seq2SeqTrainer without DeepSpeed"
    offload = args.baseline_offload if on_gpu else "none"
    if mode == "deepspeed":
        ds_config = json.loads(json.dumps(EVENT_DS_CONFIG))
        zero = ds_config["zero_optimization"]
        if offload == "none":
            zero.pop("offload_optimizer")
        if offload != "cpu-adam":  # DeepSpeed's own Adams need a C++ (and CUDA) build; torch's AdamW does not
            ds_config["optimizer"]["params"]["torch_adam"] = True
        if offload == "torch-adam":
            ds_config["zero_force_ds_cpu_optimizer"] = False
        what = {"cpu-adam": "event ds_config: ZeRO-2, optimizer offloaded to the CPU (DeepSpeedCPUAdam)",
                "torch-adam": "event ds_config: ZeRO-2, optimizer offloaded to the CPU, torch AdamW stepping there "
                              "(slower than the event's DeepSpeedCPUAdam)",
                "none": "event ds_config without the CPU offload (torch AdamW on the device"
                        + (")" if on_gpu else ", no GPU)")}[offload]
        what = "Seq2SeqTrainer + DeepSpeed, " + what
    fp16 = on_gpu and not args.baseline_fp32
    what += f", {'fp16' if fp16 else 'fp32'}, gradient checkpointing {'on' if checkpointing else 'off'}"
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *a, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = Seq2SeqTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
            max_steps=args.warmup_steps + args.steps, learning_rate=1e-5, warmup_steps=1,
            gradient_checkpointing=checkpointing, fp16=fp16, deepspeed=ds_config, report_to=[], save_strategy="no",
            eval_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=args.baseline_workers, seed=recipe.seed, use_cpu=not on_gpu)
        trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=Clips(),
                                 data_collator=EventCollator(WhisperFeatureExtractor(feature_size=config.num_mel_bins)),
                                 callbacks=[Timer()])
        trainer.train()
        engine = getattr(trainer, "deepspeed", None)
        if mode == "deepspeed" and engine is None:
            raise RuntimeError("Seq2SeqTrainer did not use DeepSpeed")
        what += f"; optimizer {optimizer_names(engine.optimizer if engine else trainer.optimizer)}"
        skipped = int(getattr(engine, "skipped_steps", 0)) if engine else 0
    timed = ends[args.warmup_steps - 1:]
    samples = batch * accum * (len(timed) - 1)
    return {"what_ran": what, "mode": mode, "offload": offload if mode == "deepspeed" else None,
            "batch_per_step": batch * accum, "micro_batch": batch, "grad_accum": accum,
            "precision": "fp16" if fp16 else "fp32", "gradient_checkpointing": checkpointing, "ds_config": ds_config,
            "loader_workers": args.baseline_workers, "steps_timed": len(timed) - 1, "seconds": timed[-1] - timed[0],
            "samples": samples, "tokens": samples * args.label_len,
            "step_seconds": [b - a for a, b in zip(timed, timed[1:], strict=False)], "skipped_steps": skipped,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}


# ---- orchestration -----------------------------------------------------------------------------------------------

def run_part(part: str, argv: list[str], env: dict, verbose: bool) -> tuple[dict | None, str]:
    """Run one side in a fresh process; returns (result or None, the tail of its output)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", part, "--part-out", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, text=True,
                              stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT)
        tail = "\n".join((proc.stdout or "").splitlines()[-30:])
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text()), tail
        return None, tail or f"exit status {proc.returncode}"


def summarise(r: dict, forward: dict, args, peak: float | None) -> dict:
    train = flop_count.training_flops(forward, r.get("freeze_encoder", False))
    sps = r["samples"] / r["seconds"]
    tflops = sps * train / 1e12
    r.update(samples_per_s=sps, audio_hours_per_hour=sps * args.clip_seconds, tokens_per_s=r["tokens"] / r["seconds"],
             achieved_tflops=tflops, mfu=tflops / peak if peak else None,
             median_step_s=sorted(r["step_seconds"])[len(r["step_seconds"]) // 2])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--zero-stage", type=int, choices=(2, 3), help="default: the recipe's")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--batch", type=int, help="clips per device per micro-batch (default: the recipe's)")
    ap.add_argument("--label-len", type=int, default=64, help="label tokens per clip, end of text included")
    ap.add_argument("--steps", type=int, help="timed steps (default: 10 on a GPU, 2 on the CPU)")
    ap.add_argument("--warmup-steps", type=int, help="untimed steps first, >= 1 (default: 3 on a GPU, 1 on the CPU)")
    ap.add_argument("--clip-seconds", type=float, default=5.0, help="mean clip duration (Common Voice: ~5 s)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: 989 on CUDA in bf16/fp16)")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "tiny_demo.yaml")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="recipe overrides, e.g. model.gradient_checkpointing=true")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--baseline-offload", choices=("cpu-adam", "torch-adam", "none"), default="cpu-adam",
                    help="on a GPU: the event's DeepSpeedCPUAdam offload (needs a CUDA toolkit to build; falls back "
                         "to none), torch AdamW on the CPU, or no offload. Always none on the CPU")
    ap.add_argument("--baseline-gradient-checkpointing", choices=("same", "on", "off"), default="same",
                    help="the event trained with it on; default: as the project run")
    ap.add_argument("--baseline-workers", type=int, default=0, help="Trainer dataloader_num_workers (event: 0)")
    ap.add_argument("--baseline-fp32", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help="torch/OpenMP threads per process (default: 1 on the CPU, which keeps "
                                                "a shared machine's timings steady; the torch default on a GPU)")
    ap.add_argument("--verbose", action="store_true", help="show the subprocesses' output")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    ap.add_argument("--part", choices=("project", "baseline-deepspeed", "baseline-plain"), help=argparse.SUPPRESS)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    on_gpu = torch.cuda.is_available()
    if args.steps is None:
        args.steps = 10 if on_gpu else 2
    if args.warmup_steps is None:
        args.warmup_steps = 3 if on_gpu else 1
    if args.warmup_steps < 1 or args.steps < 1 or args.label_len < 2:
        ap.error("--warmup-steps and --steps must be at least 1, --label-len at least 2")
    if args.label_len > 447:
        ap.error("--label-len is at most 447 (Whisper's decoder has 448 positions, one is the start token)")
    if args.precision is None:
        args.precision = "bf16" if on_gpu else "fp32"
    if not on_gpu and args.precision != "fp32":
        ap.error(f"--precision {args.precision} needs a GPU (launcher.train refuses it on the CPU)")
    if args.threads is None and not on_gpu:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.part:
        if args.part == "project":
            result = run_project(args)
        else:
            result = run_baseline(args, args.part.removeprefix("baseline-"))
        args.part_out.write_text(json.dumps(result))
        return

    env = rank_env(on_gpu, OMP_NUM_THREADS=str(args.threads or os.cpu_count() or 1))  # one process: every core
    argv = [*sys.argv[1:], "--precision", args.precision, "--steps", str(args.steps), "--warmup-steps",
            str(args.warmup_steps)]
    notes: list[str] = []
    project, tail = run_part("project", argv, env, args.verbose)
    if project is None:
        sys.exit(f"the project's step failed:\n{tail}")
    config = whisper_config(args.size)
    forward = flop_count.from_config(config, args.label_len)
    peak = peak_tflops(args, on_gpu, args.precision)
    summarise(project, forward, args, peak)
    device = project["device_name"] or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import deepspeed
    import transformers

    def write(baseline: dict | None, notes: list[str]) -> dict:
        result = {
            "benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "size": args.size, "dimensions": dict(zip(("n_mels", "d_model", "layers", "heads", "ffn", "vocab"),
                                                      SIZES[args.size], strict=True)),
            "label_len": args.label_len, "clip_seconds": args.clip_seconds, "recipe": str(args.recipe),
            "overrides": args.overrides, "peak_tflops": peak, "threads": args.threads,
            "flops_per_sample": {"forward": forward, "training": flop_count.training_flops(forward,
                                                                                          project["freeze_encoder"])},
            "project": project, "baseline": baseline,
            "speedup_samples_per_s": baseline and project["samples_per_s"] / baseline["samples_per_s"],
            "notes": notes, "targets": {"large-v3 MFU on one H100": ">= 0.45", "speed-up vs baseline": ">= 3"},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    baseline = None
    if args.baseline:  # the project's figures are saved first: a baseline cut short leaves them
        write(None, [*notes, "baseline: not finished (still running, or stopped)"])
        baseline, tail = run_part("baseline-deepspeed", argv, env, args.verbose)
        if baseline is None and on_gpu and args.baseline_offload == "cpu-adam":
            notes.append("baseline: DeepSpeedCPUAdam (the event's offload) failed, so the baseline ran WITHOUT "
                         "offload (torch AdamW on the GPU), which is faster than the event's setup: the ratio is "
                         "conservative. Error:\n" + tail)
            baseline, tail = run_part("baseline-deepspeed", [*argv, "--baseline-offload", "none"], env, args.verbose)
        if baseline is None and not on_gpu:
            notes.append("baseline: Seq2SeqTrainer + DeepSpeed failed on the CPU; plain Seq2SeqTrainer ran. Error:\n"
                         + tail)
            baseline, tail = run_part("baseline-plain", argv, env, args.verbose)
        if baseline is None:
            notes.append(f"baseline failed:\n{tail}")
        else:
            summarise(baseline, forward, args, peak)
    result = write(baseline, notes)
    ratio = result["speedup_samples_per_s"]

    print(f"Whisper {args.size} ({project['parameters'] / 1e6:.1f} M parameters, random weights) on {device}"
          + (f", {args.threads} thread(s)" if args.threads else "") + "; "
          f"{args.label_len} label tokens, {args.clip_seconds:g} s clips, {args.steps} timed steps after "
          f"{args.warmup_steps}; training FLOPs per sample {result['flops_per_sample']['training'] / 1e9:.1f} G")
    header = (f"{'':<9}{'batch':>6}{'prec':>6}{'samples/s':>11}{'audio h/h':>11}{'tokens/s':>10}{'step s':>8}"
              f"{'TFLOPS':>9}{'MFU':>7}{'peak GiB':>10}")
    print(header)
    for name, r in (("project", project), ("baseline", baseline)):
        if r is None:
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{name:<9}{r['batch_per_step']:>6}{r['precision']:>6}{r['samples_per_s']:>11.2f}"
              f"{r['audio_hours_per_hour']:>11.1f}{r['tokens_per_s']:>10.0f}{r['median_step_s']:>8.3f}"
              f"{r['achieved_tflops']:>9.3f}{mfu:>7}{mem:>10}")
    print(f"project:  {project['what_ran']}")
    if baseline:
        print(f"baseline: {baseline['what_ran']}; features by WhisperFeatureExtractor in the collator, "
              f"{baseline['loader_workers']} loader workers")
        print(f"speed-up: {ratio:.2f}x samples/s (target >= 3x on large-v3, one H100)")
    for name, r in (("project", project), ("baseline", baseline)):
        if r and r["skipped_steps"]:
            print(f"{name}: fp16 loss scaling skipped {r['skipped_steps']} optimizer step(s) (warm-up included); "
                  "a skipped step does no optimizer work, so its samples/s is flattered")
    if peak is None:
        print("MFU: n/a (no GPU peak for this device; give --peak-tflops)")
    else:
        print(f"MFU against {peak:g} TFLOPS (target >= 45% on large-v3, one H100)")
    for note in notes:
        print(note, file=sys.stderr)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
