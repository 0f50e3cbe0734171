"""All the checks of this machine together (`preflight_local`): hardware and software (`hardware`), then what the
run reads and writes (`files`). Cheap: no sha256 unless asked, no CUDA context (nvidia-smi answers), no hub download
offline."""

from __future__ import annotations

import os

from launcher.doctor.checks import Check, Gpu, _crashed, _guarded
from launcher.doctor.files import check_disk, check_model, check_shards
from launcher.doctor.hardware import (
    check_deepspeed_ops,
    check_driver,
    check_flash_attn,
    check_gpus,
    check_versions,
    detect_gpus,
    driver_version,
)
from launcher.recipe.memory import trainable_parameters
from launcher.recipe.schema import Recipe


def _model_and_size(recipe: Recipe) -> tuple[Check, dict | None, tuple[int, int] | None]:
    try:
        model, config = check_model(recipe)
        params = trainable_parameters(config, recipe.model.freeze_encoder) if config is not None else None
    except Exception as e:  # noqa: BLE001 - e.g. a config transformers refuses to build
        return _crashed("model", e), None, None
    return model, config, params


def _memory_estimate(recipe: Recipe, config: dict, world_size: int) -> float | None:
    from launcher.recipe.memory import memory_estimate

    try:
        return memory_estimate(recipe, config, world_size)["total_gib"]
    except Exception:  # noqa: BLE001 - the estimate only adds a warning
        return None


def _hardware_checks(recipe: Recipe, world_size: int, config: dict | None) -> list[Check]:
    import torch

    gpus: list[Gpu] = []
    try:
        gpus = detect_gpus()
        gpu_check = None
    except Exception as e:  # noqa: BLE001 - the gpus line says so; the others go on as without a GPU
        gpu_check = _crashed("gpus", e)
    estimate = _memory_estimate(recipe, config, world_size) if gpus and config is not None else None
    accelerator_env = os.environ.get("DS_ACCELERATOR")
    return [_guarded("driver", lambda: check_driver(torch.version.cuda, driver_version())),
            gpu_check or _guarded("gpus", lambda: check_gpus(recipe, gpus, estimate_gib=estimate,
                                                             accelerator_env=accelerator_env)),
            _guarded("deepspeed-ops", lambda: check_deepspeed_ops(recipe, world_size)),
            _guarded("flash-attn", lambda: check_flash_attn(recipe, gpus))]


def preflight_local(recipe: Recipe, world_size: int, *, verify: bool = False, free_bytes: int | None = None,
                    hardware: bool = True) -> list[Check]:
    """Every check of this machine, in a fixed order; never raises. `verify` adds every shard's sha256 (slow);
    `free_bytes` overrides the free disk space found; `hardware=False` where this machine runs none of the job's
    ranks (a SLURM login node submitting it): driver, GPUs, DeepSpeed ops and flash-attn are then not checked."""
    model, config, params = _model_and_size(recipe)
    skipped = [Check(name, "SKIP", "not checked here: the job's ranks run on other machines")
               for name in ("driver", "gpus", "deepspeed-ops", "flash-attn")]
    hardware_checks = _hardware_checks(recipe, world_size, config) if hardware else skipped
    return [_guarded("versions", check_versions), *hardware_checks, model,
            _guarded("shards", lambda: check_shards(recipe, verify)),
            _guarded("disk", lambda: check_disk(recipe, params, free_bytes))]
