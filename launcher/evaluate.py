"""One evaluation, used by the training loop and by `python -m launcher evaluate`, scored as the event scored it.

Scoring (the event's rule): WER in percent over the whole split, after transformers' BasicTextNormalizer on
both sides, references that normalise to nothing left out; greedy decoding with the language token forced.
Orthographic WER (no normalisation) and CER (normalised characters) are reported beside it. Error counts
are counted per sample (Levenshtein distance), so each prediction line carries its own errors; a test checks
the totals against an independent jiwer computation.

Distribution: each rank decodes a disjoint, contiguous slice of the split (sizes differ by at most one, a rank may
have none), so every sample is decoded exactly once; predictions are gathered to rank 0, which scores and writes
the report. Decoding runs on a plain copy of the model (`launcher.model.materialize`: under ZeRO-3 the weights are
gathered once, chunk by chunk, in the same order on every rank), so no collective runs while a rank decodes and
ranks that decode different numbers of tokens, or none, never wait on each other.

Long-form evaluation (`launcher.longform`) goes the same way with recordings joined from the split's clips in place
of the clips.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.distributed import contiguous_range, init_distributed, shutdown_distributed
from launcher.errors import LauncherError
from launcher.features import pad_batch, stack_features
from launcher.longform import build_recordings, report_fields, split_name, transcribe_recordings
from launcher.model import DTYPES, DecodeSettings, materialize
from launcher.shards import BadShard, MelRef, ShardIndex, load_index, read_samples

Progress = Callable[[int], None]  # called with the number of clips just decoded


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str
    seconds: float
    mel: MelRef
    speaker: str | None = None  # when the source names one: long-form joins only one speaker's clips


def scan_split(index: ShardIndex, split: str, max_samples: int | None = None) -> list[EvalItem]:
    """The split's samples in index order (the first `max_samples`), with where each one's features lie. Reads
    the tars' headers and JSON once; callers keep the list for every evaluation of a run."""
    items: list[EvalItem] = []
    for shard in index.shards(split):
        try:
            for sample in read_samples(shard.path, load_mel=False):
                meta = json.loads(sample.meta)
                items.append(EvalItem(meta["id"], meta["text"], meta["seconds"], sample.mel_ref,
                                      meta.get("speaker")))
                if max_samples and len(items) >= max_samples:
                    return items
        except (BadShard, ValueError, KeyError, TypeError) as e:  # reported by shard, never half-scored
            raise LauncherError(f"cannot read evaluation shard {shard.path}: {type(e).__name__}: {e}") from None
    return items


# ---- scoring ---------------------------------------------------------------------------------------------------

def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two token sequences, in C++
    (rapidfuzz): a 16 k-clip test set's character alignments take a second, not minutes."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(ref, hyp)


def normalizer_for(language: str, tokenizer=None):
    """The event's normaliser: BasicTextNormalizer, or Whisper's EnglishTextNormalizer for English."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if language in ("en", "english"):
        return EnglishTextNormalizer(getattr(tokenizer, "english_spelling_normalizer", None) or {})
    return BasicTextNormalizer()


def score(predictions: list[dict], normalize) -> tuple[dict, list[dict]]:
    """Corpus-level WER/CER in percent; each prediction gains its normalised texts and error counts. A prediction
    of a joined recording lists its parts (`references`: the clips' texts, `predictions`: the decoded segments'),
    normalised one by one so that brackets, whose content the normaliser drops, cannot reach over a join."""

    def normalized(p: dict, key: str) -> str:
        return " ".join(" ".join(normalize(t).split()) for t in p.get(key + "s", [p[key]])).strip()

    totals = {"errors": 0, "words": 0, "ortho_errors": 0, "ortho_words": 0, "char_errors": 0, "chars": 0}
    scored, dropped = [], 0
    for p in predictions:
        ref_n, hyp_n = normalized(p, "reference"), normalized(p, "prediction")
        row = {**p, "reference_normalized": ref_n, "prediction_normalized": hyp_n}
        if not ref_n.split():
            dropped += 1
            row["scored"] = False
            scored.append(row)
            continue
        ref_w, hyp_w = ref_n.split(), hyp_n.split()
        row.update(scored=True, errors=edit_distance(ref_w, hyp_w), words=len(ref_w))
        totals["errors"] += row["errors"]
        totals["words"] += row["words"]
        totals["char_errors"] += edit_distance(list(" ".join(ref_w)), list(" ".join(hyp_w)))
        totals["chars"] += len(" ".join(ref_w))
        ortho_ref = p["reference"].split()
        totals["ortho_errors"] += edit_distance(ortho_ref, p["prediction"].split())
        totals["ortho_words"] += len(ortho_ref)
        scored.append(row)

    def pct(a: str, b: str) -> float:
        return 100.0 * totals[a] / totals[b] if totals[b] else 0.0

    scores = {"wer": pct("errors", "words"), "wer_orthographic": pct("ortho_errors", "ortho_words"),
              "cer": pct("char_errors", "chars"), "samples": len(predictions), "scored": len(predictions) - dropped,
              "dropped_empty_references": dropped, "reference_words": totals["words"]}
    return scores, scored


# ---- decoding --------------------------------------------------------------------------------------------------

@torch.no_grad()
def transcribe(model, tokenizer, items: list[EvalItem], settings: DecodeSettings, device, dtype,
               progress: Progress | None = None) -> list[dict]:
    """Decode `items` on a plain model (no DeepSpeed hooks: nothing here talks to other ranks), longest first so
    batches pad little. Features are padded to Whisper's window on the device."""
    order = sorted(items, key=lambda it: -it.seconds)
    config = settings.generation_config(model)
    out = []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        stored, frames, pads = (t.to(device) for t in stack_features([it.mel.load() for it in batch]))
        features = pad_batch(stored, frames, pads, dtype)
        # Whisper reads the whole 30 s window, padding included, as in training: the mask is all ones and only
        # tells `generate` so (its encoder ignores it)
        mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device)
        tokens = model.generate(input_features=features, attention_mask=mask, generation_config=config)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        out += [{"id": it.id, "reference": it.text, "prediction": text.strip(), "seconds": it.seconds}
                for it, text in zip(batch, texts, strict=True)]
        if progress is not None:
            progress(len(batch))
    return out


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


def split_label(split: str, language: str, several: bool) -> str:
    """A report's split name: the split, and its language when a run or an evaluation has several."""
    return f"{split}-{language}" if several else split


def mean_wer(reports: dict[str, dict]) -> float:
    """The languages' WERs averaged, each language counting once (not weighted by its words)."""
    return sum(r["wer"] for r in reports.values()) / len(reports)


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


# ---- `python -m launcher evaluate` -----------------------------------------------------------------------------

def default_report_dir(model_name: str, cwd: Path | None = None) -> Path:
    """eval/<model>/ in the current directory: never inside the model's folder, which may be read-only or shared."""
    parts = [p for p in Path(model_name).parts if p not in ("/", ".", "..")][-2:]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(parts)) or "model"
    return (cwd or Path.cwd()) / "eval" / slug


def run_standalone(model_name: str, shards_dirs: list[Path], split: str, *, batch_size: int, num_beams: int,
                   max_new_tokens: int, max_samples: int | None, language: str | None, task: str,
                   out_dir: Path | None, zero_stage: int, precision: str,
                   long_form: float | None = None) -> dict[str, dict] | None:
    """Load a Hugging Face model (folder or hub id) and evaluate it on one split of each shards folder (one per
    language, each decoded with its own language token), on one process or on every rank of a
    `deepspeed`/`torchrun` launch (optionally wrapped in ZeRO-2/3, as during training); with `long_form` on
    recordings of up to that many seconds joined from the split's clips. Returns {language: report} on rank 0."""
    import os

    import torch.distributed as dist
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from launcher.console import progress_bar, quiet_libraries

    indexes = [load_index(folder) for folder in shards_dirs]
    if language and len(indexes) > 1:
        raise LauncherError("--language is for one shards folder; with several, each one's index.json names its "
                            "language")
    languages = [language or index.language for index in indexes]
    for folder, lang in zip(shards_dirs, languages, strict=True):
        if not lang:
            raise LauncherError(f"--language is needed: {Path(folder) / 'index.json'} does not name the shards' "
                                "language")
    if len(set(languages)) < len(languages):
        raise LauncherError(f"--shards: two folders of one language ({', '.join(languages)}): one per language")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    quiet_libraries(rank, verbose=False)
    on_gpu = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        init_distributed(on_gpu)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = DTYPES[precision]
    if not on_gpu and dtype != torch.float32:
        raise LauncherError(f"--precision {precision} needs a GPU; use --precision fp32 on the CPU")
    try:
        processor = WhisperProcessor.from_pretrained(model_name)
        model = WhisperForConditionalGeneration.from_pretrained(model_name, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:  # a missing folder is reported as a malformed hub id (ValueError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LauncherError(f"--model {model_name}: cannot load a Whisper model and processor ({first})") from None
    if zero_stage == 3:
        import deepspeed

        # the weights partitioned as ZeRO-3 training holds them, so this path is the one periodic evaluation takes;
        # no optimizer: nothing is trained (ZeRO-2 partitions only optimizer state and gradients: its weights are
        # whole on every rank, the plain model)
        config = {"train_micro_batch_size_per_gpu": batch_size, "zero_optimization": {"stage": zero_stage},
                  "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}
        model = deepspeed.initialize(model=model, config=config)[0].module
    model.to(device)
    reports = {}
    for index, lang in zip(indexes, languages, strict=True):
        settings = DecodeSettings(language=lang, task=task, batch_size=batch_size, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens)
        items = scan_split(index, split, max_samples)
        mine = clips_on_rank(items, world, rank, long_form)
        label = split_label(split, lang, len(indexes) > 1)
        name = split_name(label, long_form) if long_form else label
        with progress_bar(name + (f" (rank 0 of {world})" if world > 1 else ""), mine, "clips",
                          enabled=rank == 0) as advance:
            reports[lang] = evaluate(model, processor.tokenizer, items, settings, split=label, device=device,
                                     dtype=dtype, out_dir=out_dir or default_report_dir(model_name),
                                     model_name=model_name, progress=advance, long_form=long_form)
    shutdown_distributed()
    if rank != 0:
        return None
    if len(reports) > 1:
        write_mean_report(out_dir or default_report_dir(model_name), split, None, reports)
    return reports
