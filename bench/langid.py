#!/usr/bin/env python3
"""Language detection after single-language fine-tuning, with the language token trained or masked (issue 12).

Whisper detects a clip's language itself: the decoder's prediction right after <|startoftranscript|>, restricted to
the language tokens (`WhisperForConditionalGeneration.detect_language`). Fine-tuning on one language with its
token as a target (model.train_language_token=true) may teach that prediction that everything is that language;
masking the token (=false: its target is -100) should leave detection as pretrained. This measures it on real
pretrained whisper-base (../shared/tools/whisper_base_offline.py) and two synthetic espeak-ng corpora
(../shared/tools/synth_cv_corpus.py): German (1600 clips, the training language) and Spanish (400 clips, never
trained on). Held-out clips: each corpus's test split (speaker-disjoint, at most --clips of each).
Learning rate: bench/packing.py's 1e-5 already moves detection (its 17-step German run detected 12 of the 50 Spanish
test clips as German, against 0 zero-shot).

Conditions: zero-shot; German fine-tuning with the token trained; the same with the token masked. Both fine-tunings
are started as a user starts them (`deepspeed --num_gpus 1 train_ds.py --recipe recipes/tiny_demo.yaml --set ...`,
bench/packing.py's settings: encoder frozen, batch 8, fp32, constant lr, no eval, no checkpoints), the same steps
and lr, and differ only in model.train_language_token; each one's final/ weights are scored.
Detection reads the shards' stored log-mel, padded to the 30 s window as evaluation does (`stack_features`, then
`pad_batch`), runs the encoder once per batch (its outputs are kept and reused for a model whose encoder weights are
the same, bit for bit: with the encoder frozen, the fine-tuned models'), takes `detect_language`'s answer and, from
the same decoder position, the probability of the true language among the language tokens (a softmax over them, as
openai-whisper's `detect_language` gives). Per condition and language: accuracy (detected = true language), the
detected languages' counts and the mean probability of the true language. The Spanish test split holds 50 clips.

    python bench/langid.py                   # ~40 min on 2 CPU cores (~10 min encoding the 250 test clips, two
                                             # ~15 min fine-tunings, seconds for each fine-tuned model's detection)
    python bench/langid.py --steps 20        # shorter fine-tunings
    python bench/langid.py --detect-only     # re-score the runs kept in bench/.cache/langid-runs

Writes bench/results/langid.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from collections import Counter
from pathlib import Path

from launcher.testing import assets, realruns
from launcher.testing.commands import REPO, TINY_RECIPE

RESULTS = REPO / "bench" / "results" / "langid.json"
WORK = assets.BENCH_CACHE / "langid-runs"  # kept: --detect-only re-scores these
ARMS = {"token-trained": "model.train_language_token=true", "token-masked": "model.train_language_token=false"}


def arm_overrides(arm: str, lr: float) -> list[str]:
    """What an arm adds to the benchmarks' common overrides (`realruns.COMMON`; a later --set wins, so the lr
    replaces its 1e-5)."""
    return ["model.language=de", "data.pack.enabled=false", f"optim.lr={lr}", ARMS[arm]]


ENCODED: dict = {}  # (encoder weights' digest, language) -> encoder outputs per batch: a frozen encoder's are reused


def encoder_digest(model) -> str:
    digest = hashlib.sha256()
    for tensor in model.get_encoder().state_dict().values():
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def detect(model_dir: Path, shards: dict[str, Path], clips: int, batch: int = 16) -> dict:
    """{language: figures} for the test split of each language's shards."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from launcher.evaluation.items import scan_split
    from launcher.features import pad_batch, stack_features
    from launcher.shards.format import load_index

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    lang_ids = model.generation_config.lang_to_id  # {"<|de|>": id}
    names = {i: tok.strip("<|>") for tok, i in lang_ids.items()}
    columns = sorted(names)
    digest = encoder_digest(model)
    out = {}
    for lang, folder in shards.items():
        started, reused = time.perf_counter(), (digest, lang) in ENCODED
        items = scan_split(load_index(folder), "test", clips)
        detected, p_true = [], []
        with torch.no_grad():
            if not reused:
                ENCODED[digest, lang] = [model.get_encoder()(pad_batch(*stack_features(
                    [it.mel.load() for it in items[i:i + batch]]))) for i in range(0, len(items), batch)]
            for encoded in ENCODED[digest, lang]:
                ids = model.detect_language(encoder_outputs=encoded)
                sot = torch.full((len(ids), 1), model.generation_config.decoder_start_token_id)
                logits = model(encoder_outputs=encoded, decoder_input_ids=sot).logits[:, -1, columns]
                detected += [names[int(i)] for i in ids]
                p_true += logits.softmax(-1)[:, columns.index(lang_ids[f"<|{lang}|>"])].tolist()
        counts = Counter(detected)
        out[lang] = {"clips": len(items), "accuracy": counts[lang] / len(items),
                     "detected": dict(counts.most_common(5)), "mean_p_true": sum(p_true) / len(p_true),
                     "seconds": time.perf_counter() - started, "encoder_outputs_reused": reused}
        print(f"  {lang}: {out[lang]}", flush=True)
    return out


def train_arms(model: Path, de_shards: Path, steps: int, lr: float) -> dict:
    """Both arms, one after the other (`realruns.train`)."""
    shutil.rmtree(WORK, ignore_errors=True)
    runs = {}
    for arm in ARMS:
        print(f"training {arm}: {steps} steps ...", flush=True)
        started = time.perf_counter()
        log = realruns.train(model, de_shards, WORK / arm, arm_overrides(arm, lr), steps)
        runs[arm] = {**realruns.throughput(log), "command_wall_s": time.perf_counter() - started,
                     "first_loss": log[0]["loss"]}
        print(f"  {runs[arm]}", flush=True)
    return runs


def print_table(result: dict) -> None:
    print(f"{'condition':<15}{'lang':<6}{'accuracy':>9}{'P(true)':>9}  detected")
    for cond, langs in result["detection"].items():
        for lang, f in langs.items():
            seen = ", ".join(f"{k} {v}" for k, v in f["detected"].items())
            print(f"{cond:<15}{lang:<6}{f['accuracy']:>9.3f}{f['mean_p_true']:>9.3f}  {seen}  (of {f['clips']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per arm (default 30)")
    ap.add_argument("--lr", type=float, default=1e-5, help="constant learning rate of both arms (default 1e-5)")
    ap.add_argument("--clips", type=int, default=200, help="test clips per language at most (default 200)")
    ap.add_argument("--detect-only", action="store_true", help="re-score the runs kept in bench/.cache/langid-runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    for key, value in realruns.env().items():
        os.environ.setdefault(key, value)
    import deepspeed
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    model = assets.whisper_base()
    shards = {lang: realruns.corpus_shards(assets.synthetic_corpus(lang, clips), lang)
              for lang, clips in (("de", 1600), ("es", 400))}
    result = {"benchmark": "langid", "date": time.strftime("%Y-%m-%d %H:%M"), "model": str(model),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                          "transformers": transformers.__version__},
              "test_clips_max": args.clips, "shards": {k: str(v) for k, v in shards.items()},
              "training": {"recipe": str(TINY_RECIPE.relative_to(REPO)), "data": "de train split",
                           "steps": args.steps, "lr": args.lr, "batch": 8, "common_overrides": list(realruns.COMMON),
                           "arm_overrides": {arm: arm_overrides(arm, args.lr) for arm in ARMS},
                           "lr_note": "1e-5 (bench/packing.py's) already moves detection: packing's 17-step German "
                                      "run (token trained) detected 12 of 50 Spanish test clips as de"},
              "seconds": {"inputs": time.perf_counter() - started}}
    if args.detect_only:
        earlier = json.loads(args.out.read_text())
        result.update({k: earlier[k] for k in ("date", "training") if k in earlier})
        result["seconds"] = {k: v for k, v in earlier.get("seconds", {}).items() if k.startswith("train")}
        result["rescored"] = time.strftime("%Y-%m-%d %H:%M")
    result["detection"] = {}

    def score(cond: str, folder: Path) -> None:
        print(f"detecting with {cond} ...", flush=True)
        t0 = time.perf_counter()
        result["detection"][cond] = detect(folder, shards, args.clips)
        result["seconds"][f"detect {cond}"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    score("zero-shot", model)
    if not args.detect_only:
        result["training"]["runs"] = train_arms(model, shards["de"], args.steps, args.lr)
        result["seconds"].update({f"train {a}": r["command_wall_s"] for a, r in result["training"]["runs"].items()})
    for arm in ARMS:
        score(arm, WORK / arm / "final")
    result["seconds"]["total"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"saved {args.out} ({result['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
