"""The environment every test and benchmark rank runs in, and free ports (the library's own, with no hub)."""

from __future__ import annotations

import os

from launcher.launch.commands import cpu_env as ranks_env
from launcher.launch.commands import free_port

__all__ = ["cpu_env", "free_port", "rank_env", "world_of_one", "world_of_one_env"]


def cpu_env(**extra: str) -> dict:
    """The library's CPU environment for DeepSpeed ranks (`launch.commands.cpu_env`), offline: nothing in the suite
    or a benchmark may reach a hub."""
    return ranks_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


def rank_env(gpu: bool, **extra: str) -> dict:
    """A benchmark's ranks: on a GPU node the GPU environment as it is (offline, unbuffered), else `cpu_env`."""
    if not gpu:
        return cpu_env(**extra)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **extra}


def world_of_one_env() -> None:
    """The variables a launcher sets for the only rank of a process group on loopback."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1")


def world_of_one():
    """This process as the only rank of a process group on loopback, on its GPU if it has one (a benchmark that runs
    the library in-process): `world_of_one_env`, then the project's own start. Returns (on a GPU, the device)."""
    import torch

    from launcher.distributed import init_distributed, on_gpu

    world_of_one_env()
    gpu = on_gpu()
    init_distributed(gpu)
    if gpu:
        torch.cuda.set_device(0)
    return gpu, torch.device("cuda", 0) if gpu else torch.device("cpu")
