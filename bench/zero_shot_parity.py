#!/usr/bin/env python3
"""Zero-shot WER parity with real weights: this project's shard + evaluate path against the event's plain path.

Why: the tests check each piece of the evaluation on a tiny random model, whose transcripts mean nothing. This
runs a real pretrained multilingual whisper-base (`../shared/tools/whisper_base_offline.py` builds it offline into
bench/.cache/, or pass `--model DIR`) on German speech (espeak-ng's by default) and checks that the two ways
of scoring it give the same transcripts and the same WER, so that a WER the project reports can be compared with
the event's.

Project path: `launcher.shards.build.shard_corpus` (MP3 -> 16 kHz -> unpadded float16 log-mel in tar shards),
then `launcher.evaluation.items.scan_split` + `launcher.evaluation.run.evaluate` on one process (padding back to 3000
frames, batched greedy `generate`, longest clips first, BasicTextNormalizer, per-clip Levenshtein counts).
Its references are the shards' texts.
Reference path (the event's evaluation script): the same MP3 files decoded with `launcher.audio.decode_audio`, so both
paths start from identical 16 kHz samples (the shard step decodes them with the same call: the audio decoder is
shared on purpose, so what is compared is features, batching, decoding and scoring); then
`WhisperProcessor`'s feature extractor (30 s padded, float32), `model.generate(language, task="transcribe")`,
`tokenizer.batch_decode(skip_special_tokens=True)`, transformers' `BasicTextNormalizer` on both sides and
`jiwer.wer` over the pairs whose normalised reference is non-empty. Its references are the corpus TSV's raw
`sentence` column, read here with `csv`, not through the project's reader.

Both paths: the same model object (fp32, loaded once), greedy, language token forced, the same `--batch` and
`--max-new-tokens`, and the same batches: the reference path forms them as `launcher.evaluation.decode.transcribe`
does (one split at a time, clips in index order, stably sorted longest first, cut every `--batch`), so every batch
holds the same clips in the same rows on both sides. All inputs are 3000 frames, so nothing is padded, but a CPU
matmul's result for one row can depend on the batch it is in; identical batches leave the features as the only
difference: the project stores them in float16, the event computes them in float32 (the largest absolute difference
over all clips is reported). Transcripts are compared after `str.strip()` (the project strips Whisper's leading
space; the normaliser discards it anyway). One untimed `generate` on a batch of silence warms the model up before
either side is timed.

Corpus: `--corpus DIR` (a Common Voice release language folder), else `--clips` sentences spoken by espeak-ng
with `../shared/tools/synth_cv_corpus.py`, cached in bench/.cache/. `--split all` (the default) evaluates every
split the corpus has, each on its own as `evaluate` does, and pools the counts, so all 120 default clips are
scored (the synthetic corpus's test split alone holds 15). Prints a table and saves
bench/results/zero_shot_parity.json.

    python bench/zero_shot_parity.py                                   # whisper-base, 120 German clips, ~3 min
    python bench/zero_shot_parity.py --model /tmp/whisper-base --corpus /data/cv-corpus-11.0/de --split test
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.testing import assets
from launcher.testing.commands import REPO

RESULTS = REPO / "bench" / "results" / "zero_shot_parity.json"
TSV_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}  # as launcher.sources.common_voice
SHARD_BYTES = 256_000_000


@dataclass(frozen=True)
class Clip:
    """One clip as the reference path sees it: raw TSV sentence and 16 kHz audio."""

    id: str
    sentence: str
    audio: object  # np.ndarray, float32 16 kHz mono

    @property
    def seconds(self) -> float:
        return round(len(self.audio) / 16000, 4)  # as the shard step's json `seconds`


# ---- inputs ------------------------------------------------------------------------------------------------------

def read_tsv(corpus: Path, split: str) -> dict[str, tuple[str, str]]:
    """{clip id: (audio file name, raw sentence)} from a Common Voice split TSV."""
    with open(corpus / TSV_FILES[split], encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {Path(r["path"]).stem: (r["path"], r["sentence"]) for r in rows}


# ---- project path ------------------------------------------------------------------------------------------------

def project_shard(corpus: Path, lang: str, splits: list[str] | None, n_mels: int, out: Path) -> tuple[dict, float]:
    """Shard the corpus (one process); returns the index and the seconds it took."""
    from launcher.shards.build import ShardSettings, shard_corpus
    from launcher.sources.common_voice import CommonVoiceRelease

    start = time.perf_counter()
    index = shard_corpus(CommonVoiceRelease(corpus, lang), out, ShardSettings(n_mels, SHARD_BYTES, lang), workers=0,
                         splits=splits)
    return index, time.perf_counter() - start


def project_evaluate(model, tokenizer, shards: Path, split: str, settings, max_samples: int | None,
                     out_dir: Path) -> tuple[dict, list[dict], float]:
    """`launcher.evaluation.run.evaluate` on one split: its report, its per-clip rows and the seconds it took (the scan
    of the shards included)."""
    import torch

    from launcher.evaluation.items import scan_split
    from launcher.evaluation.run import evaluate
    from launcher.shards.format import load_index

    start = time.perf_counter()
    items = scan_split(load_index(shards), split, max_samples)
    report = evaluate(model, tokenizer, items, settings, split=split, device=torch.device("cpu"), dtype=model.dtype,
                      out_dir=out_dir)
    seconds = time.perf_counter() - start
    with open(out_dir / f"{split}.predictions.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return report, rows, seconds


# ---- reference path ----------------------------------------------------------------------------------------------

def load_clips(corpus: Path, split: str, ids: list[str]) -> list[Clip]:
    """The clips `ids` (the ones the shards kept, in index order): TSV sentence and audio decoded from the MP3."""
    from launcher.audio import decode_audio

    rows = read_tsv(corpus, split)
    return [Clip(cid, rows[cid][1], decode_audio((corpus / "clips" / rows[cid][0]).read_bytes())) for cid in ids]


def batches_like_project(clips: list[Clip], batch_size: int) -> list[list[Clip]]:
    """The batches `launcher.evaluation.decode.transcribe` forms on one process: stable sort longest first, cut every
    batch."""
    order = sorted(clips, key=lambda c: -c.seconds)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def check_same_batches(shards: Path, split: str, clips: list[Clip], batch_size: int, max_samples: int | None) -> None:
    """Stop unless the reference batches hold the clips `launcher.evaluation.decode.transcribe` batches together: the
    order it sorts the shards' items into (by their stored `seconds`) must be ours (by the decoded audio's length)."""
    from launcher.evaluation.items import scan_split
    from launcher.shards.format import load_index

    ours = [c.id for batch in batches_like_project(clips, batch_size) for c in batch]
    theirs = [it.id for it in sorted(scan_split(load_index(shards), split, max_samples), key=lambda it: -it.seconds)]
    if ours != theirs:
        raise SystemExit(f"{split}: the reference batches differ from the project's; the comparison would not be fair")


def reference_transcribe(model, processor, batches: list[list[Clip]], language: str,
                         max_new_tokens: int) -> dict[str, str]:
    """{clip id: transcript}: feature extractor -> generate -> batch_decode, batch by batch."""
    import torch

    out: dict[str, str] = {}
    with torch.no_grad():
        for batch in batches:
            features = processor.feature_extractor([c.audio for c in batch], sampling_rate=16000,
                                                   return_tensors="pt").input_features
            tokens = model.generate(input_features=features.to(model.dtype), language=language, task="transcribe",
                                    max_new_tokens=max_new_tokens)
            texts = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            out.update({c.id: t for c, t in zip(batch, texts, strict=True)})
    return out


def reference_wer(pairs: list[tuple[str, str]]) -> tuple[float, int]:
    """jiwer WER in percent over (reference, prediction) pairs after BasicTextNormalizer; pairs whose reference
    normalises to nothing are left out. Returns (WER, pairs scored)."""
    import jiwer
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    norm = BasicTextNormalizer()
    kept = [(norm(r), norm(p)) for r, p in pairs if norm(r).strip()]
    if not kept:
        return 0.0, 0
    return 100.0 * jiwer.wer([r for r, _ in kept], [p for _, p in kept]), len(kept)


def feature_gap(shards: Path, split: str, clips: list[Clip], processor, max_samples: int | None) -> float:
    """Largest |project features - WhisperFeatureExtractor features| over the clips (float16 storage)."""
    import torch

    from launcher.evaluation.items import scan_split
    from launcher.features import pad_features
    from launcher.shards.format import load_index

    audio = {c.id: c.audio for c in clips}
    gap = 0.0
    for item in scan_split(load_index(shards), split, max_samples):
        ref = processor.feature_extractor(audio[item.id], sampling_rate=16000, return_tensors="pt").input_features[0]
        gap = max(gap, float(torch.max(torch.abs(pad_features(item.mel.load()) - ref))))
    return gap


# ---- comparison --------------------------------------------------------------------------------------------------

def compare(project_rows: list[dict], reference: dict[str, str], sentences: dict[str, str]) -> dict:
    """Exact agreement of the transcripts (after strip) and the disagreeing clips."""
    differ = [{"id": r["id"], "sentence": sentences[r["id"]], "project": r["prediction"],
               "reference": reference[r["id"]].strip()}
              for r in project_rows if r["prediction"] != reference[r["id"]].strip()]
    n = len(project_rows)
    return {"clips": n, "agreeing": n - len(differ), "agreement_pct": 100.0 * (n - len(differ)) / n if n else 0.0,
            "disagreeing": differ}


def pooled_project_wer(rows: list[dict]) -> tuple[float, int]:
    """The project's corpus WER over several splits from its per-clip counts (what one split's report holds)."""
    scored = [r for r in rows if r["scored"]]
    words = sum(r["words"] for r in scored)
    return (100.0 * sum(r["errors"] for r in scored) / words if words else 0.0), len(scored)


def print_table(result: dict) -> None:
    p, e = result["project"], result["reference"]
    print(f"{result['model']}: {result['clips']} clips ({', '.join(result['splits'])}), "
          f"{result['audio_seconds']:.0f} s of audio, batch {result['batch']}, greedy, language "
          f"{result['language']}, max {result['max_new_tokens']} new tokens, {result['threads']} threads")
    print(f"{'path':<11}{'WER %':>8}{'scored':>8}{'seconds':>9}   seconds split")
    print(f"{'project':<11}{p['wer']:>8.2f}{p['scored']:>8}{p['seconds']:>9.1f}   "
          f"shard {p['shard_seconds']:.1f} + evaluate {p['evaluate_seconds']:.1f}")
    print(f"{'reference':<11}{e['wer']:>8.2f}{e['scored']:>8}{e['seconds']:>9.1f}   "
          f"decode {e['decode_seconds']:.1f} + features/generate {e['transcribe_seconds']:.1f} "
          f"+ score {e['score_seconds']:.2f}")
    a = result["agreement"]
    print(f"WER difference (project - reference): {result['wer_difference']:+.2f} points; transcripts agreeing "
          f"exactly: {a['agreeing']}/{a['clips']} = {a['agreement_pct']:.1f}% (target >= 99%); largest feature "
          f"difference {result['max_feature_abs_difference']:.2e}")
    for d in a["disagreeing"]:
        print(f"  {d['id']}\n    sentence:  {d['sentence']}")
        print(f"    project:   {d['project']}\n    reference: {d['reference']}")


# ---- run ---------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a Whisper folder (default: whisper-base built into bench/.cache/)")
    ap.add_argument("--corpus", type=Path, help="a Common Voice release language folder (default: synthesised)")
    ap.add_argument("--lang", default="de")
    ap.add_argument("--clips", type=int, default=120, help="clips to synthesise without --corpus")
    ap.add_argument("--split", default="all", help="train, validation, test, or all (every split, pooled)")
    ap.add_argument("--max-samples", type=int, help="the first N clips of each split")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    from launcher.model import DecodeSettings

    torch.set_num_threads(args.threads)
    # quiet: generate warns at every batch that max_new_tokens overrides the generation config's max_length (448),
    # and that no attention mask is given (none is needed: every input is 3000 frames, nothing is padded)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = args.model or assets.whisper_base()
    corpus = args.corpus or assets.synthetic_corpus(args.lang, args.clips)
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    n_mels = model.config.num_mel_bins
    with torch.no_grad():  # warm-up, untimed: one batch of silence
        model.generate(input_features=torch.zeros(args.batch, n_mels, 3000), language=args.lang, task="transcribe",
                       max_new_tokens=4)
    settings = DecodeSettings(language=args.lang, task="transcribe", batch_size=args.batch, num_beams=1,
                              max_new_tokens=args.max_new_tokens)

    with tempfile.TemporaryDirectory(prefix="zero_shot_parity-") as tmp:
        shards = Path(tmp) / "shards"
        index, shard_s = project_shard(corpus, args.lang, None if args.split == "all" else [args.split], n_mels,
                                       shards)
        splits = [s for s in index["splits"] if args.split in ("all", s)]
        rows: list[dict] = []
        reference: dict[str, str] = {}
        sentences: dict[str, str] = {}
        eval_s = decode_s = transcribe_s = gap = audio_s = 0.0
        for split in splits:
            _, split_rows, seconds = project_evaluate(model, processor.tokenizer, shards, split, settings,
                                                      args.max_samples, Path(tmp) / "eval")
            rows += split_rows
            eval_s += seconds
            start = time.perf_counter()
            clips = load_clips(corpus, split, [r["id"] for r in split_rows])
            decode_s += time.perf_counter() - start
            check_same_batches(shards, split, clips, args.batch, args.max_samples)
            start = time.perf_counter()
            reference.update(reference_transcribe(model, processor, batches_like_project(clips, args.batch),
                                                  args.lang, args.max_new_tokens))
            transcribe_s += time.perf_counter() - start
            sentences.update({c.id: c.sentence for c in clips})
            audio_s += sum(len(c.audio) for c in clips) / 16000
            gap = max(gap, feature_gap(shards, split, clips, processor, args.max_samples))

    start = time.perf_counter()
    ref_wer, ref_scored = reference_wer([(sentences[r["id"]], reference[r["id"]]) for r in rows])
    score_s = time.perf_counter() - start
    project_wer, project_scored = pooled_project_wer(rows)
    result = {
        "benchmark": "zero_shot_parity", "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": str(model_dir),
        "parameters": sum(p.numel() for p in model.parameters()), "corpus": str(corpus), "splits": splits,
        "clips": len(rows), "audio_seconds": audio_s, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "language": args.lang, "dropped_by_shard_step": index["dropped"],
        "project": {"wer": project_wer, "scored": project_scored, "seconds": shard_s + eval_s,
                    "shard_seconds": shard_s, "evaluate_seconds": eval_s},
        "reference": {"wer": ref_wer, "scored": ref_scored, "seconds": decode_s + transcribe_s + score_s,
                  "decode_seconds": decode_s, "transcribe_seconds": transcribe_s, "score_seconds": score_s},
        "wer_difference": project_wer - ref_wer,
        "max_feature_abs_difference": gap,
        "agreement": compare(rows, reference, sentences),
        "targets": {"agreement_pct": ">= 99"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(result)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
