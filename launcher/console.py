"""What reaches the console: the project's own lines, progress on anything long, other libraries kept quiet.

DeepSpeed, transformers, huggingface_hub and torch log INFO lines, progress bars and deprecation notices on every
rank; N ranks print each N times. Rank 0 keeps their warnings and errors, other ranks only errors, and
`logging.verbose: true` (or `--verbose`) gives everything back.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LIBRARIES = ("DeepSpeed", "deepspeed", "transformers", "huggingface_hub", "torch", "accelerate")
# Warnings checked and found harmless, whose cause lies in a library: hidden unless verbose.
_KNOWN_HARMLESS = [
    # transformers' own Whisper generate passes these two beside the generation config it was given (its PR #48108)
    re.compile(r"Passing `generation_config` together with generation-related arguments=\(\{'(begin_)?suppress_tokens"
               r"', '(begin_)?suppress_tokens'\}\)"),
    # deepspeed.initialize reads the learning rate once before the first step
    re.compile(r"Attempting to get learning rate from scheduler before it has started"),
]


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in _KNOWN_HARMLESS)


def quiet_libraries(rank: int, verbose: bool = False) -> None:
    """Libraries' logging: warnings and up on rank 0, errors only elsewhere; nothing changed when `verbose`."""
    if verbose:
        return
    level = logging.WARNING if rank == 0 else logging.ERROR
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    import transformers
    from deepspeed.utils import logger as ds_logger  # DeepSpeed's logger has its own handler and level
    from huggingface_hub.utils import disable_progress_bars

    ds_logger.setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards" on every rank
    disable_progress_bars()
    for handler in [*ds_logger.handlers, *transformers.utils.logging.get_logger().handlers]:
        if not any(isinstance(f, _DropKnownHarmless) for f in handler.filters):
            handler.addFilter(_DropKnownHarmless())
    # DeepSpeed's ZeRO calls the collective under its old name
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    if rank != 0:
        warnings.filterwarnings("ignore")


@contextmanager
def quiet_stdout(verbose: bool) -> Iterator[None]:
    """DeepSpeed's CPU backend print()s a line per rank when it loads its shared-memory op: not a log record."""
    if verbose:
        yield
        return
    import contextlib
    import os

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


class RateColumn(ProgressColumn):
    """Items per second over the task so far (rich's own speed column only knows bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return Text(f"{rate:.1f} {self.unit}/s")


def progress_columns(unit: str) -> tuple:
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


@contextmanager
def progress_bar(description: str, total: int, unit: str, *, enabled: bool = True,
                 console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A live bar (done/total, rate, elapsed, ETA) on stderr; yields `advance(n)`. Disabled: a no-op."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(*progress_columns(unit), console=console or Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
