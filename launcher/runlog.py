"""What rank 0 shows and writes while training: a progress display, train_log.jsonl, TensorBoard (and W&B).

Other ranks get a logger that does nothing, so the loop never branches on the rank to log."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launcher.console import RateColumn


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, max_steps: int, start_step: int, tensorboard: bool,
                 wandb_project: str | None = None, wandb_config: dict | None = None, wandb_id: str | None = None):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.jsonl = open(Path(run_dir) / "train_log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, name=Path(run_dir).name, config=wandb_config,
                                        id=wandb_id, resume="allow", dir=str(run_dir))
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
