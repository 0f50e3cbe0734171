"""Process-group start and orderly end, shared by training and evaluation."""

from __future__ import annotations

from datetime import timedelta


def init_distributed(on_gpu: bool, timeout_minutes: float | None = None) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU); `timeout_minutes` bounds how long a
    collective waits for a hung or dead rank before the job fails."""
    import deepspeed

    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kwargs)


def shutdown_distributed() -> None:
    """All ranks meet, then the process group is destroyed while the interpreter is still whole: left to
    interpreter exit, gloo's worker threads can abort the process ("terminate called without an active
    exception", exit -6) after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
