"""Process-group start and orderly end, and how work is cut among ranks, shared by training and evaluation."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

SHM_FOLDER = "/dev/shm"
CPU_OPS = ("deepspeed_shm_comm",)  # what DeepSpeed compiles for its CPU accelerator when a process group starts
STALE_LOCK_MINUTES = 10.0  # a CPU op build takes about a minute on 2 cores: a lock older than this was left behind


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
    if not on_gpu:
        use_own_ops_folder()
        check_op_locks()
    with quiet_stdout(verbose):
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kwargs)
    if not on_gpu:
        _unlink_shm_buffers()


def ops_folder() -> Path:
    """Where DeepSpeed's just-in-time compiled ops go: a folder of this virtualenv's own. torch's default,
    ~/.cache/torch_extensions, is shared by every virtualenv of the user: a second one recompiles (minutes, inside
    its first step), and a build killed midway leaves a lock there that every later run waits on, silently."""
    return Path(sys.prefix) / "torch_extensions"


def use_own_ops_folder() -> None:
    """This virtualenv's ops folder, built with this virtualenv's ninja (pinned): torch runs the `ninja` on PATH, and
    two versions (the system's 1.11 and pip's 1.13, say, in a shell with and without the virtualenv activated) hash
    the same build commands differently, so each rebuilds what the other built: minutes at every job start."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ops_folder()))
    here = Path(sys.executable).parent
    if (here / "ninja").is_file() and os.environ.get("PATH", "").split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', os.defpath)}"


def check_op_locks() -> None:
    """torch's op builds take a lock file (`FileBaton`) and wait, without a word and without end, while it exists: a
    build killed midway leaves it behind. Say so in one line with the fix instead."""
    from launcher.errors import LauncherError

    for op in CPU_OPS:
        lock = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / op / "lock"
        try:
            age = (time.time() - lock.stat().st_mtime) / 60
        except FileNotFoundError:
            continue
        if age > STALE_LOCK_MINUTES:
            raise LauncherError(f"{lock} is {age:.0f} minutes old: a build of DeepSpeed's {op} op was stopped midway "
                                f"and left it, and every run would wait on it for ever; delete it (rm {lock}) and "
                                "start again (`make setup` builds the op)")
        print(f"waiting for another process that builds DeepSpeed's {op} op ({lock}, {age:.1f} min old; if none "
              "does, delete it)", file=sys.stderr, flush=True)


def build_cpu_ops() -> None:
    """Build DeepSpeed's CPU ops into this virtualenv's folder (`make setup`), so no run compiles them."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_own_ops_folder()
    check_op_locks()
    from deepspeed.accelerator import get_accelerator

    from launcher.console import quiet_stdout

    with quiet_stdout(False):
        for op in CPU_OPS:
            builder = get_accelerator().create_op_builder("ShareMemCommBuilder" if op == "deepspeed_shm_comm" else op)
            builder.load()
    print(f"DeepSpeed's CPU ops built in {os.environ['TORCH_EXTENSIONS_DIR']}")


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


def node_rank() -> int:
    """This rank's node, counted from 0: DeepSpeed's launcher sets CROSS_RANK, torchrun GROUP_RANK, Slurm
    SLURM_NODEID."""
    for name in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def node_name() -> str:
    """This rank's node as the launch names it: its host in the hostfile (`launch` exports the hostfile's hosts in
    order as LAUNCHER_NODES), Slurm's node name, else the host name. Several "nodes" may be one machine (loopback
    addresses in a test, or containers), so the host name alone cannot tell them apart."""
    import socket

    nodes = [n for n in os.environ.get("LAUNCHER_NODES", "").split(",") if n]
    if node_rank() < len(nodes):
        return nodes[node_rank()]
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_label() -> str:
    """How reports name this rank's node: 'node 1 (127.0.0.2)' in a multi-node launch, else its host name."""
    launched = any(os.environ.get(n, "").isdigit() for n in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"))
    return f"node {node_rank()} ({node_name()})" if launched else node_name()


class Peers:
    """Who the job's ranks are (each one's node) and which of them are still there.

    Collective to build (one all-gather). Every rank's watchdog adds to a counter of its own in the rendezvous store
    (`beat`, about once a second); when a collective fails or hangs, `lost` reads the counters twice, a few beats
    apart: the ranks whose counters did not move are gone. The store lives in rank 0's process, so when it cannot be
    reached at all rank 0 is the one gone."""

    KEY = "launcher/alive/{}"
    INTERVAL = 1.0  # seconds between beats (the watchdog's wake-up, at most)

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, node_label())
        self.nodes: list[str] = nodes
        self.store = dist.distributed_c10d._get_default_store()

    def beat(self) -> None:
        try:
            self.store.add(self.KEY.format(self.rank), 1)
        except Exception:  # noqa: BLE001 - rank 0 (the store) gone: `lost` says so when it matters
            pass

    def lost(self, wait: float = 3 * INTERVAL) -> list[int]:
        """The other ranks that stopped beating (rank 0 when the store is gone)."""
        others = [r for r in range(self.world) if r != self.rank]
        try:
            before = [self.store.add(self.KEY.format(r), 0) for r in others]
            time.sleep(wait)
            after = [self.store.add(self.KEY.format(r), 0) for r in others]
        except Exception:  # noqa: BLE001 - the store is rank 0's: it went away with it
            return [0] if self.rank != 0 else []
        return [r for r, b, a in zip(others, before, after, strict=True) if a == b]

    def describe(self, ranks: list[int]) -> str:
        """'rank 1 on node 1 (127.0.0.2)': who, and where to look."""
        return ", ".join(f"rank {r} on {self.nodes[r]}" for r in ranks)

    def me(self) -> str:
        return self.describe([self.rank])


class Watchdog:
    """Ends this rank with a clear message when it makes no progress for `minutes`: a rank that is hung or dead
    leaves the others waiting in a collective. The process group's own timeout is set later than this one
    (`process_group_minutes`), so the message is ours under NCCL as well, whose watchdog would otherwise abort the
    process with its own. The loop calls `beat()` at each step, evaluation batch and save; with `peers`, this rank
    also beats in the rendezvous store, and the message names the ranks that stopped beating."""

    def __init__(self, minutes: float, message: str, peers: Peers | None = None):
        import threading

        self.seconds, self.message, self.peers = minutes * 60.0, message, peers
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
        while not self._stopped.wait(min(Peers.INTERVAL, self.seconds / 10)):
            if self.peers is not None:
                self.peers.beat()
            if time.monotonic() - self._last > self.seconds:
                lost = self.peers.lost() if self.peers is not None else []
                named = f" (not answering: {self.peers.describe(lost)})" if lost else ""
                print(self.message + named, file=sys.stderr, flush=True)
                os._exit(1)  # the rank's launcher sees it and stops the others


def process_group_minutes(minutes: float) -> float:
    """The process group's timeout: later than the watchdog's, so that the watchdog speaks first."""
    return minutes + max(0.5, 0.1 * minutes)
