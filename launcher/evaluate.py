"""One evaluation, used by the training loop and by `python -m launcher evaluate`, scored as the event scored it.

Scoring (the event's rule): WER in percent over the whole split, after transformers' BasicTextNormalizer on
both sides, references that normalise to nothing left out; greedy decoding with the language token forced.
Orthographic WER (no normalisation) and CER (normalised characters) are reported beside it. Error counts
are counted per sample (Levenshtein distance), so each prediction line carries its own errors; a test checks
the totals against an independent jiwer computation.

Distribution: each rank decodes a disjoint, contiguous slice of the split (sizes differ by at most one), so
every sample is decoded exactly once; predictions are gathered to rank 0, which scores and writes the report.
Under ZeRO-3 the 16-bit weights are gathered once for the whole evaluation, so generation runs with no
collective per token and ranks with fewer batches never leave others waiting.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launcher.data import contiguous_range
from launcher.distributed import init_distributed, shutdown_distributed
from launcher.errors import LauncherError
from launcher.features import pad_features
from launcher.index import load_index


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str
    seconds: float
    shard: Path
    mel_offset: int
    mel_size: int

    def features(self) -> torch.Tensor:
        with open(self.shard, "rb") as f:
            f.seek(self.mel_offset)
            return torch.from_numpy(np.load(io.BytesIO(f.read(self.mel_size)), allow_pickle=False))


@dataclass(frozen=True)
class DecodeSettings:
    language: str
    task: str = "transcribe"
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int = 225


def scan_split(shards_dir: Path, split: str, max_samples: int | None = None) -> list[EvalItem]:
    """The split's samples in index order (the first `max_samples`), with where each one's features lie."""
    index = load_index(shards_dir)
    if split not in index["splits"]:
        raise LauncherError(f"{shards_dir}/index.json has no split {split!r} (it has: {', '.join(index['splits'])})")
    items: list[EvalItem] = []
    for shard in index["splits"][split]["shards"]:
        path = Path(shards_dir) / shard["path"]
        mels: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext == "mel.npy":
                        mels[key] = (member.offset_data, member.size)
                    elif ext == "json":
                        meta = json.loads(tar.extractfile(member).read())
                        offset, size = mels.pop(key)
                        items.append(EvalItem(meta["id"], meta["text"], meta["seconds"], path, offset, size))
                        if max_samples and len(items) >= max_samples:
                            return items
        except (tarfile.TarError, OSError, KeyError) as e:
            raise LauncherError(f"cannot read shard {path}: {type(e).__name__}: {e}") from None
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
    """Corpus-level WER/CER in percent; each prediction gains its normalised texts and error counts."""
    totals = {"errors": 0, "words": 0, "ortho_errors": 0, "ortho_words": 0, "char_errors": 0, "chars": 0}
    scored, dropped = [], 0
    for p in predictions:
        ref_n, hyp_n = normalize(p["reference"]).strip(), normalize(p["prediction"]).strip()
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

def _gathered_weights(model):
    """Under ZeRO-3, gather the full 16-bit weights once on every rank for the whole evaluation."""
    params = list(model.parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


@torch.no_grad()
def decode(model, tokenizer, items: list[EvalItem], settings: DecodeSettings, device, dtype,
           progress=None) -> list[dict]:
    """Greedy (or beam) decoding of `items`, longest first so padding and batch shapes stay tight."""
    order = sorted(items, key=lambda it: -it.seconds)
    out = []
    was_training = model.training
    model.eval()
    with _gathered_weights(model):
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            features = torch.stack([pad_features(it.features()) for it in batch]).to(device, dtype)
            tokens = model.generate(input_features=features, language=settings.language, task=settings.task,
                                    num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens)
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            out += [{"id": it.id, "reference": it.text, "prediction": text.strip(), "seconds": it.seconds}
                    for it, text in zip(batch, texts, strict=True)]
            if progress is not None:
                progress(len(batch))
    model.train(was_training)
    return out


def evaluate(model, tokenizer, shards_dir: Path, split: str, settings: DecodeSettings, *, device, dtype,
             max_samples: int | None = None, out_dir: Path | None = None, step: int | None = None,
             model_name: str = "", recipe_text: str | None = None, progress=None) -> dict | None:
    """Decode this rank's slice, gather to rank 0 and score there. Collective when a process group is up:
    every rank must call it. Returns the report on rank 0 (None elsewhere) and writes it under `out_dir`."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    started = time.perf_counter()
    items = scan_split(shards_dir, split, max_samples)
    lo, hi = contiguous_range(len(items), world, rank)
    mine = decode(model, tokenizer, items[lo:hi], settings, device, dtype, progress)
    if distributed:
        gathered: list = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if rank != 0:
        return None
    predictions = [p for part in gathered for p in part]
    order = {it.id: i for i, it in enumerate(items)}
    predictions.sort(key=lambda p: order[p["id"]])
    if len(predictions) != len(items) or len({p["id"] for p in predictions}) != len(items):
        raise LauncherError(f"evaluation gathered {len(predictions)} predictions for {len(items)} samples")
    scores, rows = score(predictions, normalizer_for(settings.language, tokenizer))
    seconds = time.perf_counter() - started
    report = {"split": split, "step": step, **scores, "model": model_name, "world_size": world,
              "decode": {"language": settings.language, "task": settings.task, "num_beams": settings.num_beams,
                         "max_new_tokens": settings.max_new_tokens, "batch_size_per_rank": settings.batch_size},
              "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest() if recipe_text else None,
              "seconds": seconds, "samples_per_s": len(items) / seconds if seconds else 0.0,
              "audio_seconds": sum(it.seconds for it in items)}
    if out_dir is not None:
        write_report(Path(out_dir), report, rows)
    return report


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

def run_standalone(model_name: str, shards_dir: Path, split: str, *, batch_size: int, num_beams: int,
                   max_new_tokens: int, max_samples: int | None, language: str | None, out_dir: Path | None,
                   zero_stage: int, precision: str) -> dict | None:
    """Load a Hugging Face model (folder or hub id) and evaluate it on one split, on one process or on every
    rank of a `deepspeed`/`torchrun` launch (optionally wrapped in ZeRO-2/3, as during training)."""
    import os

    import torch.distributed as dist
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    index = load_index(shards_dir)
    language = language or index.get("source", {}).get("language")
    if not language:
        raise LauncherError("--language is needed: index.json does not name the shards' language")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        init_distributed(on_gpu)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if not on_gpu and dtype != torch.float32:
        raise LauncherError(f"--precision {precision} needs a GPU; use --precision fp32 on the CPU")
    try:
        processor = WhisperProcessor.from_pretrained(model_name)
        model = WhisperForConditionalGeneration.from_pretrained(model_name, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:  # a missing folder is reported as a malformed hub id (ValueError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LauncherError(f"--model {model_name}: cannot load a Whisper model and processor ({first})") from None
    if zero_stage:
        import deepspeed

        # ZeRO needs an optimizer to partition for; it is never stepped (lr 0), the engine only holds the weights
        # as training holds them, so this path is the one periodic evaluation takes.
        config = {"train_micro_batch_size_per_gpu": batch_size, "zero_optimization": {"stage": zero_stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 0.0, **({} if on_gpu else {"torch_adam": True})}},
                  "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}
        model = deepspeed.initialize(model=model, config=config)[0].module
    model.to(device)
    settings = DecodeSettings(language=language, batch_size=batch_size, num_beams=num_beams,
                              max_new_tokens=max_new_tokens)
    if out_dir is None:
        out_dir = Path(model_name) / "eval" if Path(model_name).is_dir() else Path("runs") / "eval" / model_name
    report = evaluate(model, processor.tokenizer, shards_dir, split, settings, device=device, dtype=dtype,
                      max_samples=max_samples, out_dir=out_dir, model_name=model_name)
    shutdown_distributed()
    return report
