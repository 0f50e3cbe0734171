"""`python -m launcher doctor`: a preflight that finds in seconds what would otherwise fail a 64-GPU job in its
first hour (a driver too old for the torch build, no bf16, a missing shard, a full disk, nodes that do not share
the run folder or run other code).

Two halves, each a list of `Check` (name, status, message, fix) so the caller decides what stops a run:

- `preflight_local(recipe, world_size)`: this machine. Cheap enough for `launch --run` and train start: no
  sha256 unless asked, no CUDA context in this process (nvidia-smi answers the GPU questions, so a launcher
  process that waits for the job never holds GPU memory or an exclusive-mode GPU), no hub download when
  HF_HUB_OFFLINE is set and only huggingface_hub's short timeouts otherwise.
- `preflight_distributed(recipe)`: collective, called by every rank after `init_distributed`. A few
  collectives, no model: the run folder is one folder every rank sees, and the code, recipe, libraries and
  shards index are the same everywhere. Every rank gets the same verdict, so all ranks stop together instead
  of one leaving while the others wait in a collective until the timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.distributed import node_label
from launcher.doctor.checks import Check, Gpu, _line, failed, render
from launcher.doctor.files import check_disk, check_model, check_shards, checkpoint_bytes, disk_needed
from launcher.doctor.hardware import check_deepspeed_ops, check_driver, check_flash_attn, check_gpus, optimizer_class
from launcher.doctor.machine import preflight_local
from launcher.doctor.ranks import _odd_ones, _ranks_text, preflight_distributed
from launcher.recipe.schema import Recipe

__all__ = ["Check", "Gpu", "check_deepspeed_ops", "check_disk", "check_driver", "check_flash_attn", "check_gpus",
           "check_model", "check_shards", "checkpoint_bytes", "disk_needed", "failed", "optimizer_class",
           "preflight_distributed", "preflight_job", "preflight_local", "render", "run_doctor", "summary", "_odd_ones"]


# ---- `python -m launcher doctor` ----------------------------------------------------------------------------

DOCTOR_TIMEOUT_MINUTES = 10.0  # a rank that never comes: the doctor should not wait the recipe's 30 minutes


def render_nodes(nodes: list[tuple[int, str, list[Check] | None]]) -> str:
    """The local checks of every node (each node's local rank 0 runs them): a line the same everywhere once,
    the others once per variant with the ranks that gave it."""
    reported = [(r, h, {c.name: c for c in checks}) for r, h, checks in nodes if checks]
    names = list(dict.fromkeys(name for _, _, checks in reported for name in checks))  # nodes may run other code
    lines = []
    for name in names:
        variants: dict[Check, list[tuple[int, str]]] = {}
        for r, h, checks in reported:
            if name in checks:
                variants.setdefault(checks[name], []).append((r, h))
        if len(variants) == 1 and sum(map(len, variants.values())) == len(reported):
            lines.append(_line(next(iter(variants)), f"[all {len(reported)} nodes] " if len(reported) > 1 else ""))
        else:
            lines += [_line(c, f"[{_ranks_text(members)}] ") for c, members in variants.items()]
    return "\n".join(lines)


def summary(checks: list[Check]) -> str:
    fails, warns = (sum(c.status == s for c in checks) for s in ("FAIL", "WARN"))
    tail = f", {warns} warning(s)" if warns else ""
    return f"doctor: {fails} check(s) failed{tail}" if fails else f"doctor: no check failed{tail}"


def preflight_job(recipe: Recipe, *, verify: bool = False) -> tuple[list[Check], str]:
    """Collective, every rank after init_distributed (and its set_device): the distributed checks on every rank,
    the local ones once per node (its LOCAL_RANK 0), gathered. Returns every check of the job, the same list on
    every rank (so all stop or none), and the report for rank 0 to print."""
    import torch.distributed as dist

    shared = preflight_distributed(recipe)
    local_rank0 = int(os.environ.get("LOCAL_RANK", 0)) == 0
    local = preflight_local(recipe, dist.get_world_size(), verify=verify) if local_rank0 else None
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, (dist.get_rank(), node_label(), local))
    checks = shared + [c for _, _, node in nodes if node for c in node]
    return checks, "\n".join((render_nodes(nodes), render(shared), summary(checks)))


def _every_rank(recipe: Recipe, verify: bool) -> int:
    """Under a launcher (WORLD_SIZE > 1): join the process group, run preflight_job, rank 0 prints; every rank
    exits with the same code."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from launcher.distributed import init_distributed, on_gpu, shutdown_distributed

    gpu = on_gpu()
    init_distributed(gpu, min(recipe.deepspeed.timeout_minutes, DOCTOR_TIMEOUT_MINUTES))
    if gpu:  # NCCL's object collectives use the current device: one GPU per rank, as in training
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    checks, report = preflight_job(recipe, verify=verify)
    if dist.get_rank() == 0:
        print(report, flush=True)
    shutdown_distributed()
    return 1 if failed(checks) else 0


def run_doctor(recipe_path: Path, overrides: list[str] | None = None, *, world_size: int | None = None,
               verify: bool = False) -> int:
    """The `doctor` command: 0 when no check failed, 1 otherwise (a recipe that does not load raises
    LauncherError, exit 2). Started by a launcher with WORLD_SIZE > 1, the distributed checks run too."""
    from launcher.recipe.load import load_recipe

    recipe = load_recipe(Path(recipe_path), overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _every_rank(recipe, verify)
    if world_size is None:
        import torch

        world_size = max(1, torch.cuda.device_count())
    checks = preflight_local(recipe, world_size, verify=verify)
    print(render(checks), summary(checks), sep="\n", flush=True)
    return 1 if failed(checks) else 0
