"""`train_ds.py` and `python -m launcher.train` (what every rank runs): the recipe checked, then the trainer
(`launcher.training.trainer`), and a failing rank's error made one line where it can be.

Everything that can be wrong with a recipe is checked before the process group starts; a rank that fails leaves at
once (`os._exit`) rather than hang in exit handlers while the others wait for it, and DeepSpeed's launcher stops the
rest.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path

from launcher.distributed import on_gpu, shutdown_distributed
from launcher.errors import LauncherError
from launcher.launch.envfile import load_secrets
from launcher.recipe.checks import check_against_data_and_model
from launcher.recipe.load import load_recipe
from launcher.recipe.schema import Recipe
from launcher.training.stopping import hung_rank_message, rank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_ds.py", description="Fine-tune Whisper with DeepSpeed from a recipe.")
    p.add_argument("--recipe", required=True, type=Path)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe fields, e.g. --set optim.lr=1e-5 deepspeed.zero_stage=3")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load_secrets()  # before anything reaches the hub or W&B
        recipe = load_recipe(args.recipe, args.overrides)
        sets, config = check_against_data_and_model(recipe)
        _check_precision(recipe)
    except LauncherError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from launcher.console import quiet_libraries

    quiet_libraries(rank(), recipe.logging.verbose)
    die_with_parent()
    try:
        train(recipe, sets, config, resume=args.resume, resume_command=resume_command(args))  # finished or stopped
        # on request (SIGTERM, the STOP file): both exit 0
        shutdown_distributed()
    except BaseException as e:  # noqa: BLE001 - a failing rank must die now, not hang in exit handlers
        code = 2 if isinstance(e, LauncherError) else 1
        try:  # whoever read our output may be gone (a broken pipe): leave all the same
            if isinstance(e, LauncherError):
                print(f"error (rank {rank()}): {e}", file=sys.stderr)
            elif isinstance(e, RuntimeError) and "timed out" in str(e).lower():
                print(f"{hung_rank_message(recipe.deepspeed.timeout_minutes)}\n  ({e})", file=sys.stderr)
            else:
                traceback.print_exc()
                advice = _advice(traceback.format_exc())
                if advice:
                    print(f"error (rank {rank()}): {advice}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            # Python's normal exit would join loader workers, flush writers and tear down the process group while
            # other ranks wait in a collective for this one: leave at once, and DeepSpeed's launcher stops the rest.
            os._exit(code)
    return 0


def _advice(text: str) -> str | None:
    """The launcher's one line of advice for a known failure (the rendezvous port taken, ...), if any."""
    try:
        from launcher.launch import explain_launch_failure
    except ImportError:
        return None
    return explain_launch_failure(1, text)


def _check_precision(recipe: Recipe) -> None:
    import torch

    precision = recipe.deepspeed.precision
    if precision == "fp32":
        return
    if not on_gpu():
        raise LauncherError(f"deepspeed.precision: got {precision!r}, expected 'fp32' without a GPU "
                            "(add --set deepspeed.precision=fp32 for a CPU run)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise LauncherError("deepspeed.precision: got 'bf16', but this GPU has no bf16 (it needs Ampere or newer); "
                            "use fp16")


def train(recipe: Recipe, sets: list, model_config: dict, resume: bool = False,
          resume_command: str = "the same command with --resume") -> bool:
    """Run the recipe on every rank (`launcher.training.trainer.Trainer`). Returns False when it stopped early on
    request (a checkpoint is saved)."""
    from launcher.training.trainer import Trainer

    return Trainer(recipe, sets, model_config, resume=resume, resume_command=resume_command).train()


def resume_command(args: argparse.Namespace) -> str:
    """The `launch` command that continues this run (with the launch's own --mode and hosts)."""
    return shlex.join(["python", "-m", "launcher", "launch", "--recipe", str(args.recipe),
                       *(["--set", *args.overrides] if args.overrides else []), "--resume"])


def die_with_parent() -> None:
    """A rank whose launcher is killed (a node's DeepSpeed launcher, SIGKILLed or OOM-killed) must not train on as
    an orphan holding its GPU: the kernel sends it SIGKILL when its parent goes (Linux's PR_SET_PDEATHSIG). The
    other ranks then find it gone (`distributed.Peers`) and stop with a message."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent went before the call
        os._exit(1)


if __name__ == "__main__":
    raise SystemExit(main())
