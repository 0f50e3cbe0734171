"""Checkpoints of a run (DeepSpeed engine state + the loop's own state) and the Hugging Face export.

runs/<name>/checkpoints/step-N/   DeepSpeed's files (model, optimizer, scheduler, per-rank ZeRO partitions)
                                  plus loop.json (step, batches consumed, best WER so far, ...)
runs/<name>/checkpoints/latest    the tag to resume from (written by DeepSpeed after a complete save)
runs/<name>/final/, best/         Hugging Face folders: from_pretrained + WhisperProcessor + pipeline
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from launcher.errors import LauncherError

LOOP_STATE = "loop.json"


def save_checkpoint(engine, run_dir: Path, step: int, loop_state: dict, keep_last: int, keep: set[str]) -> Path:
    """Collective: every rank calls it. Prunes to the newest `keep_last` plus the tags in `keep` (best by WER)."""
    folder = Path(run_dir) / "checkpoints"
    tag = f"step-{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"loop": loop_state})
    if dist.get_rank() == 0:
        (folder / tag / LOOP_STATE).write_text(json.dumps(loop_state, indent=2))
        steps = sorted((p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                       key=lambda p: int(p.name[5:]))
        for old in steps[:-keep_last]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder / tag


def resume_checkpoint(engine, run_dir: Path) -> dict:
    """Load the latest checkpoint into the engine; returns the loop state saved with it."""
    folder = Path(run_dir) / "checkpoints"
    if not (folder / "latest").is_file():
        raise LauncherError(f"--resume: no checkpoint in {folder} (no 'latest' file); start without --resume")
    path, client = engine.load_checkpoint(str(folder), load_module_strict=True)
    if path is None:
        raise LauncherError(f"--resume: DeepSpeed could not load the checkpoint named in {folder / 'latest'}")
    return client["loop"]


def export_hf(engine, out: Path, processor, generation: dict) -> Path | None:
    """Collective: write a Hugging Face folder (weights gathered from every rank under ZeRO-3) on rank 0."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; the full state on rank 0 only
    else:
        state = engine.module.state_dict()
    if dist.get_rank() == 0:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        model.config.use_cache = True
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for key, value in generation.items():
            setattr(model.generation_config, key, value)
        model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out
