#!/usr/bin/env python3
"""Packing: packed-with-timestamps against unpacked training, throughput and quality in one run, same clips and
hardware (issue 11).

1. Features: `features.join_features` (joining stored features when a window is loaded) against the log-mel of the
   joined audio, on real test clips: how much differs, and where.
2. Two fine-tunings (encoder frozen, as the tool's reference run) of real pretrained whisper-base
   (../shared/tools/whisper_base_offline.py) on a synthetic German corpus (../shared/tools/synth_cv_corpus.py,
   1600 clips, speaker-disjoint splits), each for the same wall-clock budget, started as a user starts them
   (`deepspeed --num_gpus 1 train_ds.py --recipe recipes/tiny_demo.yaml --set ...`, 1 rank): unpacked (one clip
   per sample), and packed (30 s windows, data.timestamp_probability=0.5). A 4-step probe of each arm gives its
   seconds per step, from which its step count for the budget follows.
   Throughput: training audio-seconds per wall-second from the runs' own train_log.jsonl (`audio_s_per_s`).
3. The test split scored for zero-shot, unpacked and packed: short-form WER (`launcher evaluate`, greedy, as the
   event scored) and long-form WER (`launcher evaluate --long-form 30`) with its timestamp sanity.

    python bench/packing.py                   # ~1 h on 2 CPU cores
    python bench/packing.py --budget 300      # shorter training budget per arm (seconds)
    python bench/packing.py --score-only      # score the runs an earlier invocation trained (kept in bench/.cache)
    python bench/packing.py --score-only --keep-short   # ... re-using the short-form reports already there

Writes bench/results/packing.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from launcher.testing import assets, realruns
from launcher.testing.commands import REPO
from launcher.testing.commands import TINY_RECIPE as RECIPE
from launcher.testing.realruns import runaways, throughput

RESULTS = REPO / "bench" / "results" / "packing.json"
CACHE = assets.BENCH_CACHE
COMMON = ["model.language=de", *realruns.COMMON]
ARMS = {"packed": ["data.pack.enabled=true", "data.pack.max_seconds=30", "data.timestamp_probability=0.5"],
        "unpacked": ["data.pack.enabled=false"]}


def train(model: Path, shards: Path, run_dir: Path, arm: str, steps: int) -> list[dict]:
    return realruns.train(model, shards, run_dir, ["model.language=de", *ARMS[arm]], steps)


def seconds_per_step(log: list[dict]) -> float:
    """Wall seconds of a training step, past the first (loader start, first allocations)."""
    later = log[1:] or log
    return sum(r["window_s"] for r in later) / len(later)


def throughput_ratios(work: Path, runs: dict) -> dict:
    """Packed over unpacked audio-seconds per wall-second, from the budget runs and from the 4-step probes (back to
    back, so the fairer figure when the machine's load changed during the longer runs)."""
    probes = {arm: throughput([json.loads(x) for x in (work / f"probe-{arm}" / "train_log.jsonl").read_text()
                               .splitlines()]) for arm in runs}
    return {"throughput_ratio_audio_s": runs["packed"]["audio_s_per_s"] / runs["unpacked"]["audio_s_per_s"],
            "probe_throughput": probes,
            "throughput_ratio_audio_s_probes": probes["packed"]["audio_s_per_s"] / probes["unpacked"]["audio_s_per_s"]}


def evaluate(model: Path, shards: Path, out: Path, long_form: float | None) -> dict:
    return realruns.evaluate(model, shards, out, long_form=long_form)


def feature_join_difference(shards: Path, corpus: Path, clips: int = 60) -> dict:
    """Joined stored features against the joined audio's log-mel, for windows of consecutive test clips."""
    import numpy as np

    from launcher.audio import decode_audio
    from launcher.features import HOP_LENGTH, N_FRAMES, join_features, log_mel_spectrogram
    from launcher.shards.format import load_index
    from launcher.shards.reader import load_mel, read_samples

    rows = {}
    for line in (corpus / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split("\t")
        rows[Path(fields[1]).stem] = fields[1]
    stored = [(json.loads(s.meta)["id"], load_mel(s.mel)) for shard in load_index(shards).shards("test")
              for s in read_samples(shard.path)][:clips]
    gap, diffs, joins, windows, at_joins, frames, differing = 20, [], 0, 0, [], 0, 0
    i = 0
    while i < len(stored):
        ids, mels, offsets, end = [], [], [], 0
        while i < len(stored) and (not mels or end + gap + stored[i][1].shape[-1] <= N_FRAMES):
            offsets.append(end + gap if mels else 0)
            ids.append(stored[i][0])
            mels.append(stored[i][1].astype(np.float32))
            end = offsets[-1] + mels[-1].shape[-1]
            i += 1
        waves = [decode_audio((corpus / "clips" / rows[cid]).read_bytes()) for cid in ids]
        audio = np.zeros(offsets[-1] * HOP_LENGTH + len(waves[-1]), dtype=np.float32)
        for w, o in zip(waves, offsets, strict=True):
            audio[o * HOP_LENGTH: o * HOP_LENGTH + len(w)] = w
        reference, joined = log_mel_spectrogram(audio), join_features(mels, offsets)
        diff = np.abs(joined - reference)
        near = np.zeros(diff.shape[-1], dtype=bool)
        for o in offsets[1:]:
            near[max(0, o - 2): o + 3] = True
        diffs.append(diff[:, ~near].max())
        frames += diff.shape[-1]
        differing += int((diff.max(axis=0) > 0.01).sum())
        at_joins.append(diff[:, near].max() if near.any() else 0.0)
        joins += len(offsets) - 1
        windows += 1
    return {"windows": windows, "joins": joins, "clips": len(stored),
            "max_abs_diff_away_from_joins": float(max(diffs)),
            "max_abs_diff_within_2_frames_of_a_join": float(max(at_joins)),
            "frames": frames, "frames_differing_over_0.01": differing,
            "note": "log-mel units after Whisper's (x + 4) / 4 scaling (a clip spans about 3 of them); stored "
                    "features are float16, so ~1e-3 away from joins is their rounding"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=600.0, help="training wall seconds per arm (default 600)")
    ap.add_argument("--clips", type=int, default=1600)
    ap.add_argument("--long-form", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--score-only", action="store_true",
                    help="keep the features and training figures of --out and score the runs kept in the cache")
    ap.add_argument("--keep-short", action="store_true", help="with --score-only: re-use the short-form reports in "
                    "the cache (rescore long-form only)")
    args = ap.parse_args()
    import deepspeed
    import torch
    import transformers

    started = time.perf_counter()
    model, corpus = assets.whisper_base(), assets.synthetic_corpus("de", args.clips)
    shards = realruns.corpus_shards(corpus, "de")
    index = json.loads((shards / "index.json").read_text())
    result = {"benchmark": "packing", "date": time.strftime("%Y-%m-%d %H:%M"), "budget_s_per_arm": args.budget,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version()},
              "corpus": {s: {"clips": v["samples"], "seconds": v["seconds"]} for s, v in index["splits"].items()},
              "recipe": str(RECIPE.relative_to(REPO)), "overrides": COMMON, "arms": ARMS}
    work = CACHE / "packing-runs"  # kept: a failure after training loses nothing
    if args.score_only:
        earlier = json.loads(args.out.read_text())
        result.update({k: earlier[k] for k in ("date", "budget_s_per_arm", "feature_join", "training",
                                                "throughput_ratio_audio_s", "probe_throughput",
                                                "throughput_ratio_audio_s_probes", "notes") if k in earlier})
        result["scored"] = time.strftime("%Y-%m-%d %H:%M")
    else:
        train_both(args, model, corpus, shards, work, result)
    score(args, model, shards, work, result)
    result["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"throughput_ratio_audio_s": result["throughput_ratio_audio_s"],
                      **{k: (v["short_form"]["wer"], v["long_form"].get("wer")) for k, v in result["scores"].items()}},
                     indent=1))
    print(f"saved {args.out} ({result['seconds']:.0f} s)")


def train_both(args, model: Path, corpus: Path, shards: Path, work: Path, result: dict) -> None:
    """The feature measurement, then each arm: a 4-step probe, and the steps the probe says fit the budget."""
    print("features: joined stored vs joined audio ...", flush=True)
    result["feature_join"] = feature_join_difference(shards, corpus)
    print(f"  {result['feature_join']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    runs = {}
    for arm in ARMS:
        probe = seconds_per_step(train(model, shards, work / f"probe-{arm}", arm, 4))
        steps = max(2, int(args.budget / probe))
        print(f"{arm}: {probe:.1f} s/step in the probe -> {steps} steps for {args.budget:.0f} s", flush=True)
        t0 = time.perf_counter()
        log = train(model, shards, work / arm, arm, steps)
        runs[arm] = {**throughput(log), "probe_seconds_per_step": probe,
                     "training_wall_s": sum(r["window_s"] for r in log), "command_wall_s": time.perf_counter() - t0}
        print(f"  {runs[arm]}", flush=True)
    result["training"] = runs
    result.update(throughput_ratios(work, runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def score(args, model: Path, shards: Path, work: Path, result: dict) -> None:
    """Short-form and long-form test WER, with timestamp sanity, of zero-shot, unpacked and packed."""
    models = {"zero-shot": model, "unpacked": work / "unpacked" / "final", "packed": work / "packed" / "final"}
    scores = {}
    for name, folder in models.items():
        kept = work / f"eval-{name}" / "test.json"
        if args.keep_short and kept.is_file():
            short = json.loads(kept.read_text())
            short["eval_seconds"] = short["seconds"]
        else:
            short = evaluate(folder, shards, work / f"eval-{name}", None)
        long = evaluate(folder, shards, work / f"eval-{name}-long", args.long_form)
        scores[name] = {"short_form": {**{k: short.get(k) for k in ("wer", "wer_orthographic", "cer", "samples",
                                                                      "eval_seconds")},
                                       **runaways(work / f"eval-{name}" / "test.predictions.jsonl")},
                        "long_form": {k: v for k, v in long.items() if not isinstance(v, list | dict) or
                                      k.startswith("timestamp")}}
        print(f"{name}: short WER {short.get('wer')}, long WER {long.get('wer')}", flush=True)
        result["scores"] = scores
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
