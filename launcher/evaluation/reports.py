"""What an evaluation writes: <split>[-step-N].json and its .predictions.jsonl, the mean over languages, and where
standalone reports go."""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher.evaluation.scoring import mean_wer


def split_label(split: str, language: str, several: bool) -> str:
    """A report's split name: the split, and its language when a run or an evaluation has several."""
    return f"{split}-{language}" if several else split


def write_mean_report(out_dir: Path, split: str, step: int | None, reports: dict[str, dict]) -> Path:
    """<split>-mean[-step-N].json beside the languages' reports: each one's scores and the mean WER."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"split": split, "step": step, "wer_mean": mean_wer(reports),
               "languages": {lang: {k: r[k] for k in ("split", "wer", "wer_orthographic", "cer", "scored", "samples")}
                             for lang, r in reports.items()}}
    path = out_dir / f"{report_name(f'{split}-mean', step)}.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def report_name(split: str, step: int | None) -> str:
    return f"{split}-step-{step}" if step is not None else split


def write_report(out_dir: Path, report: dict, rows: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report_name(report["split"], report["step"])
    with open(out_dir / f"{name}.predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def default_report_dir(model_name: str, cwd: Path | None = None) -> Path:
    """eval/<model>/ in the current directory: never inside the model's folder, which may be read-only or shared."""
    parts = [p for p in Path(model_name).parts if p not in ("/", ".", "..")][-2:]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(parts)) or "model"
    return (cwd or Path.cwd()) / "eval" / slug
