"""Process-group start and orderly end, and how work is cut among ranks, shared by training and evaluation."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

SHM_FOLDER = "/dev/shm"


def on_gpu() -> bool:
    """Whether DeepSpeed's accelerator here is a GPU (DS_ACCELERATOR=cpu, or no GPU, makes it the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def init_distributed(on_gpu: bool, timeout_minutes: float | None = None, verbose: bool = False) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU); `timeout_minutes` bounds how long a
    collective waits for a hung or dead rank before the job fails."""
    import deepspeed

    from launcher.console import quiet_stdout

    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    with quiet_stdout(verbose):
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kwargs)
    if not on_gpu:
        _unlink_shm_buffers()


def _unlink_shm_buffers() -> None:
    """On the CPU, DeepSpeed's shared-memory all-reduce gives each rank a 66 MB file in /dev/shm and never removes
    it (its shared_close is not called): every multi-rank CPU run left them behind, RAM that only a reboot or rm
    gives back (14 GB on this project's test machine). Once every rank has mapped every other's buffer (the
    barrier), each rank unlinks its own name: the mappings live on until the ranks exit, even when killed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT', '*')}_{dist.get_rank()}"
    for path in Path(SHM_FOLDER).glob(pattern):
        path.unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """All ranks meet, then the process group is destroyed while the interpreter is still whole: left to
    interpreter exit, gloo's worker threads can abort the process ("terminate called without an active
    exception", exit -6) after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def contiguous_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of `part` when `total` items are cut into `parts` ranges whose sizes differ by at most 1."""
    base, extra = divmod(total, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


class Watchdog:
    """Ends this rank with a clear message when it makes no progress for `minutes`: a rank that is hung or dead
    leaves the others waiting in a collective. The process group's own timeout is set later than this one
    (`process_group_minutes`), so the message is ours under NCCL as well, whose watchdog would otherwise abort the
    process with its own. The loop calls `beat()` at each step, evaluation batch and save."""

    def __init__(self, minutes: float, message: str):
        import threading

        self.seconds, self.message = minutes * 60.0, message
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.seconds / 10)):
            if time.monotonic() - self._last > self.seconds:
                print(self.message, file=sys.stderr, flush=True)
                os._exit(1)  # the rank's launcher sees it and stops the others


def process_group_minutes(minutes: float) -> float:
    """The process group's timeout: later than the watchdog's, so that the watchdog speaks first."""
    return minutes + max(0.5, 0.1 * minutes)
