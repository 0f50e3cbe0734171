#!/usr/bin/env python3
"""Shard-step throughput and storage, against the event's feature path, on the same clips in one run.

This project: `launcher.shards.build.shard_corpus` (decode + resample + unpadded float16 log-mel + tar writing):
in one process (`--workers 0`: one core's work, the per-core figure), and with one worker per core, where
the figure is audio seconds per wall second per core (worker start-up and inter-process copies included;
the workers' CPU time is not visible to this process, they are forkserver children).
The event's path (the community fine-tuning script): a `datasets` map that, per clip, decodes to 16 kHz
and calls `WhisperFeatureExtractor` (30 s padded float32), written to the Arrow cache. datasets >= 4
decodes audio only through torchcodec/FFmpeg, not installed here, so both paths decode with the same
soundfile + soxr call; the difference measured is feature extraction and storage.

Reports audio seconds per CPU second (user + system, this process and its workers) and bytes per audio
hour, and saves bench/results/shard_throughput.json.

    python bench/shard_throughput.py                       # makes a 300-clip German corpus with espeak-ng
    python bench/shard_throughput.py --corpus /tmp/cv-de   # any Common Voice release folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from launcher import audio  # noqa: E402
from launcher.shards.build import ShardSettings, shard_corpus
from launcher.sources.common_voice import CommonVoiceRelease  # noqa: E402
from launcher.testing.assets import TOOLS
from launcher.testing.commands import REPO

SYNTH = TOOLS / "synth_cv_corpus.py"


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn) -> tuple[float, float, object]:
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    result = fn()
    return cpu_seconds() - cpu0, time.perf_counter() - wall0, result


def project_path(corpus: Path, lang: str, out: Path, n_mels: int, workers: int) -> dict:
    source = CommonVoiceRelease(corpus, lang)
    settings = ShardSettings(n_mels=n_mels, shard_bytes=256_000_000, language=lang)
    cpu, wall, index = measure(lambda: shard_corpus(source, out, settings, workers=workers, overwrite=True))
    if workers > 0:
        cpu = wall * workers  # every core busy for the whole run: the workers' own CPU is out of reach
    seconds = sum(s["seconds"] for s in index["splits"].values())
    size = sum(sh["bytes"] for s in index["splits"].values() for sh in s["shards"])
    samples = sum(s["samples"] for s in index["splits"].values())
    return {"clips": samples, "audio_seconds": seconds, "cpu_seconds": cpu, "wall_seconds": wall,
            "audio_s_per_cpu_s": seconds / cpu, "bytes": size, "mb_per_audio_hour": size / 1e6 / (seconds / 3600)}


def event_path(corpus: Path, lang: str, cache: Path, n_mels: int) -> dict:
    import csv

    import datasets
    from transformers import WhisperFeatureExtractor

    rows = []
    for tsv in ("test.tsv", "dev.tsv", "train.tsv"):
        with open(corpus / tsv, encoding="utf-8") as f:
            rows += list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    ds = datasets.Dataset.from_dict({"path": [str(corpus / "clips" / r["path"]) for r in rows],
                                     "sentence": [r["sentence"] for r in rows]})
    extractor = WhisperFeatureExtractor(feature_size=n_mels)

    def prepare(batch):
        pcm = audio.decode_audio(Path(batch["path"]).read_bytes())  # stands in for Audio(sampling_rate=16000)
        batch["input_features"] = extractor(pcm, sampling_rate=16000).input_features[0]
        batch["seconds"] = len(pcm) / 16000
        return batch

    datasets.disable_progress_bars()
    cpu, wall, mapped = measure(lambda: ds.map(prepare, remove_columns=["path"],
                                               cache_file_name=str(cache / "event.arrow")))
    seconds = float(np.sum(mapped["seconds"]))
    size = (cache / "event.arrow").stat().st_size
    return {"clips": len(mapped), "audio_seconds": seconds, "cpu_seconds": cpu, "wall_seconds": wall,
            "audio_s_per_cpu_s": seconds / cpu, "bytes": size, "mb_per_audio_hour": size / 1e6 / (seconds / 3600)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, help="Common Voice release folder (default: synthesise one)")
    ap.add_argument("--lang", default="de")
    ap.add_argument("--clips", type=int, default=300, help="clips to synthesise when --corpus is not given")
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shard_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures for both paths

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "corpus"
            subprocess.run([sys.executable, str(SYNTH), "--lang", args.lang, "--clips", str(args.clips),
                            "--out", str(corpus)], check=True)
        ours = project_path(corpus, args.lang, tmp / "shards", args.n_mels, workers=0)
        all_cores = project_path(corpus, args.lang, tmp / "shards1", args.n_mels, workers=os.cpu_count())
        shutil.rmtree(tmp / "shards")
        shutil.rmtree(tmp / "shards1")
        (tmp / "cache").mkdir()
        event = event_path(corpus, args.lang, tmp / "cache", args.n_mels)

    padded_f32_per_hour = args.n_mels * 3000 * 4 * (event["clips"] / (event["audio_seconds"] / 3600)) / 1e6
    result = {
        "benchmark": "shard_throughput", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
        platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "corpus": str(args.corpus or f"synth_cv_corpus --lang {args.lang} --clips {args.clips}"),
        "n_mels": args.n_mels, "mean_clip_seconds": ours["audio_seconds"] / ours["clips"],
        "project": ours, "project_one_worker_per_core": all_cores, "event": event,
        "speedup_per_core": ours["audio_s_per_cpu_s"] / event["audio_s_per_cpu_s"],
        "padded_float32_mb_per_audio_hour": padded_f32_per_hour,
        "storage_ratio_vs_padded_float32": padded_f32_per_hour / ours["mb_per_audio_hour"],
        "targets": {"speedup_per_core": ">= 5", "mb_per_audio_hour_80_bins": "<= 60"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{ours['clips']} clips, {ours['audio_seconds'] / 60:.1f} min of audio "
          f"(mean {result['mean_clip_seconds']:.2f} s), {args.n_mels} mel bins")
    print(f"{'path':<10}{'audio s / core s':>18}{'CPU s':>10}{'wall s':>10}{'MB / audio hour':>18}")
    for name, r in (("project", ours), (f"{os.cpu_count()} workers", all_cores), ("event", event)):
        print(f"{name:<10}{r['audio_s_per_cpu_s']:>18.1f}{r['cpu_seconds']:>10.2f}{r['wall_seconds']:>10.2f}"
              f"{r['mb_per_audio_hour']:>18.1f}")
    print(f"speed-up per core: {result['speedup_per_core']:.1f}x (target >= 5x); "
          f"storage {ours['mb_per_audio_hour']:.1f} MB per audio hour (target <= 60) vs "
          f"{padded_f32_per_hour:.0f} MB padded float32 ({result['storage_ratio_vs_padded_float32']:.1f}x smaller)")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
