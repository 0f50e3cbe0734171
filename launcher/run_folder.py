"""A run folder's layout: every path of `runs/<name>/` in one place (DESIGN.md's run folder contract).

    recipe.yaml, ds_config.json   the resolved recipe and the DeepSpeed config built from it
    train_log.jsonl, tensorboard/ what rank 0 logs; samples/rank-R.jsonl each step's clips (logging.sample_ids)
    checkpoints/step-N/, latest   complete or absent (launcher.training.checkpoint owns what is inside)
    best/, final/                 Hugging Face folders: the best by WER so far, the delivered model
    eval/                         reports (launcher.evaluation.reports names them)
    export/final-ct2-<q>/         `launcher export`
    STOP                          asks every rank to save and stop (the SLURM script's trap, `launch --run`)

Light on purpose (no torch): `launch` and the SLURM script writer use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STOP_FILE = "STOP"  # <output_dir>/STOP: every rank saves a checkpoint at its next step boundary and exits 0
LATEST = "latest"  # checkpoints/latest: the tag to resume from


def tag(step: int) -> str:
    """A checkpoint's name: step-N."""
    return f"step-{step}"


def step_of(name: str) -> int | None:
    """N of a checkpoint named step-N; None for anything else (a .tmp folder, `latest`)."""
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def samples_log(self, rank: int) -> Path:
        return self.root / "samples" / f"rank-{rank}.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / tag(step)

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def export(self, model: str, quantization: str) -> Path:
        return self.root / "export" / f"{model}-ct2-{quantization}"

    @property
    def stop_file(self) -> Path:
        return self.root / STOP_FILE
