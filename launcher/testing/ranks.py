"""Ranks forked from a warm interpreter: real processes in a real gloo process group, without the ~15 s of imports a
`deepspeed --num_gpus N` launch pays before its first step.

A DeepSpeed launch on the CPU starts the `deepspeed` runner, its per-node launcher and then every rank, and each of
them imports torch (and most of them DeepSpeed and transformers) on its own. The suite starts dozens of jobs; here
one interpreter (multiprocessing's forkserver) imports all of that once, and every rank is a fork of it: a process
of its own, with its own environment, working directory, output file and process group, which runs a module or a
script as `python -m` / `python` would and joins the job's process group through the variables DeepSpeed's launcher
sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT). As DeepSpeed's launcher does, a rank that
fails takes the others down with it. What the launcher itself adds (ssh/pdsh, --no_ssh node ranks, the grace it gives
signalled ranks) is proven by the tests that start the real one (`commands.deepspeed_cmd`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path

from launcher.testing.env import cpu_env, free_port

# imported once by the warm interpreter: everything a rank of the project imports before its first step
PRELOAD = ["launcher.testing.preload"]


@contextmanager
def _environ(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def warm_up() -> None:
    """Start the warm interpreter (a few seconds, once per process); later calls return at once. It is started with
    the CPU environment, so what the imports read from it (DS_ACCELERATOR, OMP_NUM_THREADS) is the ranks'."""
    forkserver.set_forkserver_preload(PRELOAD)
    with _environ(cpu_env()):
        forkserver.ensure_running()


def _rank_main(target: str, argv: list[str], env: dict, cwd: str, log: str) -> None:
    """In the forked rank: become `python -m target argv...` (or `python target argv...` for a .py path)."""
    import runpy

    os.setsid()  # the rank and its loader workers: one process group, killed together
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # A forkserver's child inherits "forkserver" as its default start method: the rank's loader workers would each
    # start from a new forkserver of its own (an interpreter importing torch and the project: ~2.5 s a run). A rank
    # DeepSpeed's launcher starts is a plain interpreter with the platform's default (fork on Linux): the same here.
    multiprocessing.set_start_method(None, force=True)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    code: object = 0
    try:
        if target.endswith(".py"):
            sys.argv = [target, *argv]
            sys.path[0] = str(Path(target).resolve().parent)
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = [target, *argv]
            sys.path[0] = cwd
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as an interpreter would: the traceback, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


@dataclass
class Job:
    """The ranks of one job. `wait` returns their exit codes (a negative code: killed by that signal)."""

    processes: list
    logs: list[Path]
    port: int
    codes: list[int | None] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def poll(self) -> list[int | None]:
        return [p.exitcode for p in self.processes]

    @property
    def running(self) -> bool:
        """Every rank still running (a job whose rank ended is ending: its launcher would stop the others)."""
        return all(c is None for c in self.poll())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every rank's process group (the rank and its loader workers)."""
        for p in self.processes:
            if p.exitcode is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float = 600, *, stop_on_failure: bool = True) -> list[int]:
        """Until every rank has ended; a rank that fails ends the others (SIGKILL), as DeepSpeed's launcher does,
        unless `stop_on_failure` is False (ranks started on several machines, each by its own launcher). Past
        `timeout` every rank is killed and TimeoutError raised."""
        deadline = time.monotonic() + timeout
        while True:
            codes = self.poll()
            if all(c is not None for c in codes):
                self.codes = codes
                return codes
            if stop_on_failure and any(c not in (None, 0) for c in codes):
                self.kill()
            if time.monotonic() > deadline:
                self.kill()
                for p in self.processes:
                    p.join(10)
                raise TimeoutError(f"ranks still running after {timeout:.0f} s:\n{self.output[-4000:]}")
            multiprocessing.connection.wait([p.sentinel for p in self.processes if p.exitcode is None], 0.2)

    @property
    def outputs(self) -> list[str]:
        """What each rank printed (stdout and stderr)."""
        return [log.read_text(errors="replace") if log.is_file() else "" for log in self.logs]

    @property
    def output(self) -> str:
        """What every rank printed, rank 0 first."""
        return "\n".join(self.outputs)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for p in self.processes:
            p.join(10)


@dataclass(frozen=True)
class Rank:
    """What one rank differs in: its working directory, extra arguments and environment."""

    cwd: Path | None = None
    argv: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)


def start(target: str, argv: Sequence[str] = (), *, ranks: int | Sequence[Rank] = 2, cwd: Path, logs: Path,
          env: dict | None = None, port: int | None = None) -> Job:
    """Start a job of ranks that each run `target` (a module, or a .py path relative to `cwd`) with `argv` and
    the CPU environment plus `env`; one node, rendezvous on 127.0.0.1:`port` (default: a free one). `ranks` is a
    count, or one `Rank` each. Each rank's output goes to `logs`/rank-R.log."""
    warm_up()
    specs = [Rank() for _ in range(ranks)] if isinstance(ranks, int) else list(ranks)
    port = port or free_port()
    logs.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    processes, paths = [], []
    for rank, spec in enumerate(specs):
        rank_env = cpu_env(**{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(specs)),
                              "LOCAL_SIZE": str(len(specs)), "CROSS_RANK": "0", "CROSS_SIZE": "1",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {}), **spec.env})
        log = logs / f"rank-{rank}.log"
        log.unlink(missing_ok=True)
        p = ctx.Process(target=_rank_main, args=(target, [*argv, *spec.argv], rank_env, str(spec.cwd or cwd),
                                                 str(log)), daemon=False)
        p.start()
        processes.append(p)
        paths.append(log)
    return Job(processes, paths, port)
