"""One evaluation on every rank: each decodes its own contiguous slice on a plain copy of the model (no collective
while decoding), predictions are gathered to rank 0, which scores and writes the report."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from launcher.distributed import contiguous_range
from launcher.errors import LauncherError
from launcher.evaluation.decode import Progress, transcribe
from launcher.evaluation.items import EvalItem
from launcher.evaluation.longform import build_recordings, report_fields, split_name, transcribe_recordings
from launcher.evaluation.reports import write_report
from launcher.evaluation.scoring import normalizer_for, score
from launcher.model import DecodeSettings, materialize


def units(items: list[EvalItem], long_form: float | None = None) -> list:
    """What evaluation decodes one at a time: the clips, or (long-form, `long_form` seconds) recordings joined from
    them."""
    return build_recordings(items, long_form) if long_form else items


def clips_on_rank(items: list[EvalItem], world: int, rank: int, long_form: float | None = None) -> int:
    """The clips this rank decodes: the total of its progress bar."""
    todo = units(items, long_form)
    lo, hi = contiguous_range(len(todo), world, rank)
    return sum(len(r.clips) for r in todo[lo:hi]) if long_form else hi - lo


def evaluate(model, tokenizer, items: list[EvalItem], settings: DecodeSettings, *, split: str, device, dtype,
             out_dir: Path | None = None, step: int | None = None, model_name: str = "",
             recipe_text: str | None = None, progress: Progress | None = None,
             long_form: float | None = None) -> dict | None:
    """Decode this rank's slice of `items` on a plain copy of `model`, gather to rank 0 and score there. Collective
    when a process group is up: every rank must call it. Returns the report on rank 0 (None elsewhere) and writes
    it under `out_dir`. With `long_form` (seconds) the clips are first joined into recordings of at most that
    length, and the report is named for it (test-long-30s)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    started = time.perf_counter()
    todo = units(items, long_form)
    decode = transcribe_recordings if long_form else transcribe
    lo, hi = contiguous_range(len(todo), world, rank)
    plain = materialize(model, device, dtype)  # collective under ZeRO-3
    try:
        mine = decode(plain, tokenizer, todo[lo:hi], settings, device, dtype, progress)
    finally:
        del plain
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the copy's memory goes back before training resumes
    if distributed:
        gathered: list = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if rank != 0:
        return None
    predictions = [p for part in gathered for p in part]
    order = {u.id: i for i, u in enumerate(todo)}
    predictions.sort(key=lambda p: order[p["id"]])
    if len(predictions) != len(todo) or len({p["id"] for p in predictions}) != len(todo):
        raise LauncherError(f"evaluation gathered {len(predictions)} predictions for {len(todo)} "
                            + ("recordings" if long_form else "samples"))
    scores, rows = score(predictions, normalizer_for(settings.language, tokenizer))
    seconds = time.perf_counter() - started
    name = split_name(split, long_form) if long_form else split
    report = {"split": name, "step": step, **scores, "model": model_name, "world_size": world,
              "decode": {"language": settings.language, "task": settings.task, "num_beams": settings.num_beams,
                         "max_new_tokens": settings.max_new_tokens, "batch_size_per_rank": settings.batch_size},
              "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest() if recipe_text else None,
              "seconds": seconds, "samples_per_s": len(items) / seconds if seconds else 0.0,
              "audio_seconds": sum(it.seconds for it in items)}
    if long_form:
        report.update(report_fields(long_form, rows))
    if out_dir is not None:
        write_report(Path(out_dir), report, rows)
    return report
