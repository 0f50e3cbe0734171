"""Training as the suite and the benchmarks start it: through DeepSpeed's own launcher, as a user does
(`deepspeed_cmd`, `run_deepspeed`), or as ranks forked from a warm interpreter (`train`: the same ranks, the same
process group, without the launcher's imports)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.launch.commands import deepspeed_runner
from launcher.testing import ranks as warm
from launcher.testing.env import cpu_env, free_port

REPO = Path(__file__).resolve().parents[2]  # a checkout's root: train_ds.py and recipes/ (tests and benches run there)
TINY_RECIPE = REPO / "recipes" / "tiny_demo.yaml"


def deepspeed_cmd(*args: str) -> list[str]:
    """`deepspeed ARGS`: the runner installed beside this Python (a virtualenv need not be activated)."""
    return [deepspeed_runner(), *args]


def training_cmd(overrides: Sequence[str], ranks: int = 2, extra: Sequence[str] = (),
                 recipe: Path = TINY_RECIPE) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port FREE train_ds.py --recipe RECIPE [EXTRA] --set OVERRIDES`."""
    return deepspeed_cmd("--num_gpus", str(ranks), "--master_port", str(free_port()), "train_ds.py",
                         "--recipe", str(recipe), *extra, "--set", *overrides)


def run_deepspeed(overrides: Sequence[str], *, ranks: int = 2, extra: Sequence[str] = (), timeout: float = 600,
                  check: bool = True, env: dict | None = None, recipe: Path = TINY_RECIPE
                  ) -> subprocess.CompletedProcess:
    """Training started by DeepSpeed's launcher on the CPU, in the checkout."""
    proc = subprocess.run(training_cmd(overrides, ranks, extra, recipe), cwd=REPO, env=cpu_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@dataclass(frozen=True)
class Finished:
    """A job of warm ranks that has ended: the launcher's exit code (the first failing rank's, else 0), each
    rank's, everything the ranks printed (rank 0 first; `outputs`: each rank's), and the rendezvous port."""

    returncode: int
    codes: list[int]
    outputs: list[str]
    port: int

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)


def run_ranks(target: str, argv: Sequence[str], *, ranks: int | Sequence[warm.Rank] = 2, logs: Path,
              env: dict | None = None, timeout: float = 600, check: bool = True, cwd: Path = REPO,
              stop_on_failure: bool = True) -> Finished:
    """`target` (a module, or a script path) run by a job of warm ranks to its end (`ranks.Job.wait`)."""
    with warm.start(target, argv, ranks=ranks, cwd=cwd, logs=logs, env=env) as job:
        codes = job.wait(timeout, stop_on_failure=stop_on_failure)
        result = Finished(next((c for c in codes if c != 0), 0), codes, job.outputs, job.port)
    if check and result.returncode != 0:
        raise AssertionError(f"{target} exited {codes}\n{result.output[-8000:]}")
    return result


def train(overrides: Sequence[str], *, logs: Path, ranks: int = 2, extra: Sequence[str] = (), **kw) -> Finished:
    """`train_ds.py --recipe tiny_demo.yaml [EXTRA] --set OVERRIDES` on `ranks` warm ranks (see `run_ranks`)."""
    return run_ranks("train_ds.py", ["--recipe", str(TINY_RECIPE), *extra, "--set", *overrides], ranks=ranks,
                     logs=logs, **kw)
