"""What a run writes as it trains: rank 0's progress display, train_log.jsonl, TensorBoard (and W&B); every rank's
samples/rank-R.jsonl (`SampleLog`); and both cut back to a checkpoint's step on a resume.

Other ranks get a logger that does nothing, so the loop never branches on the rank to log."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launcher.console import RateColumn
from launcher.run_folder import RunFolder


class RunLogger:
    def __init__(self, run: RunFolder, *, enabled: bool, max_steps: int, start_step: int, tensorboard: bool,
                 wandb_project: str | None = None, wandb_config: dict | None = None, wandb_id: str | None = None):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.jsonl = open(run.train_log, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard))
        if wandb_project:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, name=run.name, config=wandb_config,
                                        id=wandb_id, resume="allow", dir=str(run.root))
            self.wandb_id = self.wandb_run.id
        self.live = self.console.is_terminal
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not self.live)
        self.task = self.progress.add_task("train", total=max_steps, completed=start_step, status="")
        self.progress.start()

    def log(self, record: dict) -> None:
        """One logged step: appended to train_log.jsonl, TensorBoard and W&B, shown on the console."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                if self.tb:
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb_run:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        status = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s  "
                  + (f"{record['audio_s_per_s']:.0f} audio-s/s  " if "audio_s_per_s" in record else "")
                  + f"epoch {record['epoch']}")
        if self.live:
            self.progress.update(self.task, completed=step, status=status)
        else:
            self.console.print(f"step {step}  {status}", soft_wrap=True)

    @contextmanager
    def progress_task(self, description: str, total: int, unit: str = "clips") -> Iterator[Callable[[int], None]]:
        """A second bar under the training one while something long runs (an evaluation); yields `advance(n)`."""
        if not (self.enabled and self.live):
            yield lambda n: None
            return
        rate = RateColumn(unit)
        task = self.progress.add_task(description, total=total, status="")

        def advance(n: int) -> None:
            self.progress.advance(task, n)
            self.progress.update(task, status=str(rate.render(next(t for t in self.progress.tasks if t.id == task))))

        try:
            yield advance
        finally:
            self.progress.remove_task(task)

    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if self.tb and isinstance(value, int | float):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb_run:
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def print(self, message: str) -> None:
        if self.enabled:
            (self.progress.console if self.live else self.console).print(message, soft_wrap=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb_run:
            self.wandb_run.finish()


class SampleLog:
    """samples/rank-R.jsonl: the ids (and epochs) of every clip this rank trained on, step by step (with packing, the
    clips of each window). Line-buffered: every step's ids are on disk before the next step, whatever kills the
    process."""

    def __init__(self, path: Path, packed: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.packed = packed
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, step: int, batches: list[dict]) -> None:
        for batch in batches:
            record = {"step": step, "ids": batch["ids"], "epochs": batch["epochs"]}
            if self.packed:
                record["windows"] = batch["windows"]
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after `step`: they were logged after the checkpoint being resumed and will be redone."""
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):  # a line torn by the kill
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)
