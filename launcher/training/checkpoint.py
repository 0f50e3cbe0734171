"""Checkpoints of a run, complete or absent, and the Hugging Face export.

runs/<name>/checkpoints/step-N/   DeepSpeed's files (model, optimizer, scheduler, ZeRO partitions of every rank),
                                  rank-R.pt (each rank's RNG states and loader position), loop.json (step,
                                  batches consumed, best WER so far, logger run id, world size), recipe.yaml
runs/<name>/checkpoints/step-N/universal/   the same state in DeepSpeed's universal form, made on a resume
                                  on another number of ranks
runs/<name>/checkpoints/latest    the tag to resume from (launcher.run_folder names these paths)

Atomicity: every rank writes into step-N.tmp/, all ranks meet, rank 0 renames the folder to step-N/ and only
then replaces `latest` (write + rename). A crash at any point leaves either the previous checkpoint as latest
or the new one complete; a left-over step-N.tmp/ is never read and is removed by the next save. Checkpoints
live on a file system every rank sees (the usual shared run folder).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from launcher.errors import LauncherError
from launcher.run_folder import RunFolder, step_of, tag

LOOP_STATE = "loop.json"
UNIVERSAL = "universal"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LoopState:
    """What the loop carries from step to step and across a resume (loop.json)."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches taken from this rank's loader since the run began
    best: list[tuple[float, int]] = field(default_factory=list)  # (validation WER, step), best first
    wandb_id: str | None = None
    world_size: int = 1
    nonfinite_in_row: int = 0

    def record_wer(self, wer: float, step: int, keep: int) -> bool:
        """Keep the `keep` best checkpoints by WER (a tie goes to the later, longer-trained step). True when `step`
        is now the best."""
        self.best = sorted([*self.best, (wer, step)], key=lambda b: (b[0], -b[1]))[:keep]
        return bool(self.best) and self.best[0] == (wer, step)

    @property
    def kept_tags(self) -> set[str]:
        return {tag(step) for _, step in self.best}

    def to_json(self) -> dict:
        return {**asdict(self), "best": [[wer, step] for wer, step in self.best]}

    @classmethod
    def from_json(cls, data: dict) -> LoopState:
        # loop.json of earlier versions named the best checkpoints by tag ("step-40")
        best = [(float(w), int(s.split("-")[1]) if isinstance(s, str) else int(s)) for w, s in data.get("best", [])]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "best"}
        return cls(**known, best=best)


def rng_state() -> dict:
    """This process's random states (torch CPU and GPU, NumPy, Python), as tensors and plain values only, so
    they load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run: RunFolder, loop: LoopState, rank_state: dict, *, keep_last: int,
                    recipe_text: str) -> Path:
    """Collective: every rank calls it. Prunes to the newest `keep_last` plus the best by WER (`loop.best`)."""
    folder = run.checkpoints
    rank = dist.get_rank()
    name, tmp_tag = tag(loop.step), f"{tag(loop.step)}.tmp"
    if rank == 0:
        shutil.rmtree(folder / tmp_tag, ignore_errors=True)  # the remains of a save that crashed
    dist.barrier()
    # the universal-checkpoint marker lets ds_to_universal convert it for a resume on another number of ranks (a
    # purely data-parallel model needs no tensor-parallel merge patterns in it)
    universal = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(folder), tag=tmp_tag, client_state={"loop": loop.to_json(), **universal},
                           save_latest=False)
    torch.save(rank_state, folder / tmp_tag / f"rank-{rank}.pt")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        _write_atomic(folder / tmp_tag / LOOP_STATE, json.dumps(loop.to_json(), indent=2))
        _write_atomic(folder / tmp_tag / "recipe.yaml", recipe_text)
        shutil.rmtree(folder / name, ignore_errors=True)  # the same step saved again after a resume
        os.rename(folder / tmp_tag, folder / name)
        _write_atomic(run.latest, name)
        steps = sorted((p for p in folder.glob("step-*") if p.is_dir() and step_of(p.name) is not None),
                       key=lambda p: step_of(p.name))
        for old in steps[:-keep_last]:
            if old.name not in loop.kept_tags:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder / name


@dataclass(frozen=True)
class ResumePoint:
    folder: Path  # runs/<name>/checkpoints
    tag: str  # step-N
    loop: LoopState  # loop.json

    @property
    def world_size(self) -> int:
        return self.loop.world_size


def find_resume_point(run: RunFolder) -> ResumePoint:
    """The checkpoint `latest` names, checked complete; read before the engine exists (its world size decides
    whether DeepSpeed must load it as a universal checkpoint)."""
    folder = run.checkpoints
    if not run.latest.is_file():
        raise LauncherError(f"--resume: no checkpoint in {folder} (no '{run.latest.name}' file); start without "
                            "--resume")
    name = run.latest.read_text().strip()
    if not (folder / name / LOOP_STATE).is_file():
        raise LauncherError(f"--resume: {folder / name} is incomplete (no {LOOP_STATE})")
    return ResumePoint(folder, name, LoopState.from_json(json.loads((folder / name / LOOP_STATE).read_text())))


def to_universal(point: ResumePoint) -> str:
    """Collective. Rank 0 converts the checkpoint's ZeRO partitions, cut for its old number of ranks, into
    DeepSpeed's universal form (one file per parameter and optimizer state) under step-N/universal/, once; the
    engine must then be built with `checkpoint.load_universal`. Returns the tag to load."""
    src = point.folder / point.tag
    out = src / UNIVERSAL
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"--resume: {src} was written by {point.world_size} ranks; converting it once for "
              f"{dist.get_world_size()} (DeepSpeed universal checkpoint, into {out})", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(src), "--output_folder", str(tmp), "--num_extract_workers", "2",
                               "--num_merge_workers", "1"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LauncherError(f"--resume: converting {src} for {dist.get_world_size()} ranks failed "
                                f"(deepspeed.checkpoint.ds_to_universal exited {proc.returncode}):\n"
                                f"{proc.stderr[-2000:]}")
        os.rename(tmp, out)
    dist.barrier()
    return f"{point.tag}/{UNIVERSAL}"


def load_checkpoint(engine, point: ResumePoint, tag: str) -> list[dict]:
    """Load model, optimizer and scheduler into the engine; returns every old rank's own state (rank-R.pt)."""
    path, _ = engine.load_checkpoint(str(point.folder), tag=tag, load_module_strict=True)
    if path is None:
        raise LauncherError(f"--resume: DeepSpeed could not load {point.folder / tag}")
    return [torch.load(point.folder / point.tag / f"rank-{r}.pt", weights_only=True) for r in range(point.world_size)]


def load_weights(engine, folder: Path, tag: str) -> None:
    """Collective: the weights of checkpoint `tag` into the engine, whatever number of ranks wrote it; no optimizer
    or scheduler state (for the end of a run). Under ZeRO-3, DeepSpeed 0.19's `load_checkpoint` without optimizer
    states takes the weights from the folder's `latest`, whatever `tag` says, so they are read here from `tag`'s
    partitions (zero_to_fp32, as DeepSpeed does) and loaded through the engine's gathered parameters."""
    if engine.zero_optimization_partition_weights():
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a few lines per rank
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        engine.load_module_state_dict({"module": state}, strict=True, fetch_z3_params=True)
        return
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise LauncherError(f"could not load the weights of {folder / tag}")


def export_hf(engine, out: Path, processor, settings) -> Path:
    """Collective: write a Hugging Face folder on rank 0, from a plain copy of the weights (gathered from every rank
    under ZeRO-3), with `settings` (launcher.model.DecodeSettings) as its generation config, so that a pipeline
    decodes as the reported WER was measured. The live model and its configs are left as they are."""
    from launcher.model import materialize

    rank0 = dist.get_rank() == 0
    dtype = next(engine.module.parameters()).dtype
    plain = materialize(engine.module, torch.device("cpu"), dtype, here=rank0)
    if rank0:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.config.use_cache = True  # training switched it off; generation wants it
        plain.generation_config = settings.generation_config(plain)
        plain.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # transformers 5 folds the feature extractor into processor_config.json; converters (CTranslate2) and older
        # transformers read preprocessor_config.json
        processor.feature_extractor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out
