#!/usr/bin/env python3
"""Training-loader throughput per worker, against what one GPU consumes.

Measured: `launcher.data.train_loader` over `launcher.data.ShardStream`, exactly as `launcher.train` builds them
(rank 0 of 1, shuffled, sha256 verified once per worker, labels made by `launcher.labels.LabelEncoder`, the stored
float16 frames stacked to the batch's longest clip by `launcher.data.collate` inside the workers, pinned on a GPU
machine; the padding to Whisper's 3000 frames is done later, on the device, by the training step), reading real shards:
`--shards DIR`, or by default the bundled French corpus sharded into a temporary folder with
`launcher.shards.build.shard_corpus`. The tokenizer is the tiny model's (`launcher.tiny_model.build_tiny_whisper`, built
in a temporary folder; Whisper's own BPE tokenises at a similar speed).

For each `--workers` count, batches are drawn for `--seconds` after the first one (the first batch, which pays for
starting the workers and hashing the shards, is reported apart as start-up): samples/s, and samples/s per worker
(the main process counts as the one worker when `--workers 0`). One GPU's consumption comes from
`--gpu-samples-per-s`, by default the project's samples/s in bench/results/train_throughput.json (else 100); the
ratio is what the rank's loader delivers over what its GPU consumes (target: >= 10x), and the last line projects it
to `--node-workers` workers (default: one per core here) at the per-worker rate measured with the most workers.
The bundled corpus is sharded with the n_mels of that run's model (80 or 128) unless `--n-mels` says otherwise.
Note: the bundled shards sit in the page cache; shards read from a cold disk or a network filesystem are slower.

Remote rows (`--remote`, on by default): the same shards uploaded to S3-API servers on loopback (moto's, as the tests
use, each in a process of its own), one answering at once and one 50 ms late to every request (`--latency-ms`), and
read from `s3://` with `--remote-workers` loader workers (default 1: on 2 cores the servers need the other one, as a
bucket's server is elsewhere), the local folder measured again beside them, in `--rounds` rounds (9) that take the
three in turn (a shared machine's slow spells fall on all three): the median round of each; with shards streamed and
fetched ahead (`data.prefetch_shards`, 2) the remote rate should stay within 0.9 of the local one. Beside the rate,
the CPU the loader's processes spend per sample (its worker, and for a URL the worker's transfer process, which
downloads and checks the bytes): what streaming costs, which a slow spell of the machine does not change. The
bundled corpus's shards are a few kB, so its remote rows measure round trips per clip; the committed figures come
from real-sized shards (64 MB, the packing benchmark's German set, which `bench/packing.py` makes on its first run):

    python bench/loader_throughput.py --shards bench/.cache/cv-de-3300-shards --seconds 8

Saves bench/results/loader_throughput.json.

    python bench/loader_throughput.py                                  # ~20 s on 2 cores
    python bench/loader_throughput.py --shards shards/fr --workers 0,1,2,4,8 --seconds 20
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

TRAIN_RESULT = REPO / "bench" / "results" / "train_throughput.json"


def gpu_consumption(args) -> tuple[float, str, int | None]:
    """(samples/s of one GPU, where that figure comes from, the model's n_mels if known)."""
    if TRAIN_RESULT.is_file():
        r = json.loads(TRAIN_RESULT.read_text())
        n_mels = r.get("dimensions", {}).get("n_mels")
        if args.gpu_samples_per_s is None:
            return (r["project"]["samples_per_s"],
                    f"{TRAIN_RESULT.relative_to(REPO)}: Whisper {r['size']}, {r['project']['precision']}, "
                    f"batch {r['project']['batch_per_step']}, on {r['device']}", n_mels)
        return args.gpu_samples_per_s, "--gpu-samples-per-s", n_mels
    return (args.gpu_samples_per_s or 100.0,
            "--gpu-samples-per-s" if args.gpu_samples_per_s else "default (no train_throughput.json)", None)


def shard_demo(out: Path, n_mels: int) -> Path:
    from launcher.shards.build import ShardSettings, shard_corpus
    from launcher.sources.common_voice import CommonVoiceRelease

    shard_corpus(CommonVoiceRelease(DEMO_CORPUS, "fr"), out, ShardSettings(n_mels, 2_000_000, "fr"), workers=0)
    return out


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU of these processes so far (those gone are left out)."""
    import psutil  # DeepSpeed's dependency

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def gone(pids: set[int], timeout: float = 60) -> None:
    """Until these processes have ended: a loader's workers (and their transfer processes, which end with them)
    would otherwise go on prefetching through the next measurement, on the same cores."""
    import gc

    import psutil

    gc.collect()
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)


def measure(stream, workers: int, seconds: float, pin: bool) -> dict:
    """Batches for `seconds` after the first; the CPU the loader's processes spent meanwhile (its workers and what
    they started, such as a remote set's transfer processes; this process's own when `workers` is 0)."""
    import psutil

    from launcher.data.loader import train_loader

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # a benchmark's servers are not the loader's
    loader = train_loader(stream, workers, pin_memory=pin)
    start = time.perf_counter()
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter()
    pids = {p.pid for p in me.children(recursive=True)} - before if workers else {me.pid}
    cpu_start = cpu_seconds(pids)
    samples, batches = 0, 0
    while time.perf_counter() - first < seconds:
        batch = next(it)
        samples += len(batch["ids"])
        batches += 1
    elapsed = time.perf_counter() - first
    cpu = cpu_seconds(pids) - cpu_start
    shape = list(batch["features"].shape)
    del it  # shuts the workers down
    gone(pids - {me.pid})
    rate = samples / elapsed
    return {"workers": workers, "startup_s": first - start, "batches": batches, "samples": samples,
            "seconds": elapsed, "samples_per_s": rate, "samples_per_s_per_worker": rate / max(workers, 1),
            "loader_cpu_ms_per_sample": 1000 * cpu / max(samples, 1), "batch_shape": shape}


def remote(args, shards: Path, labels, workers: int, pin: bool) -> list[dict]:
    """The local folder and the same shards from two loopback S3 servers (without and with added latency), read the
    same way (`workers` loader workers, sha256 checked, `--prefetch` shards fetched ahead), in `--rounds` rounds
    that take the three in turn, so a slower spell of a shared machine falls on all of them: per source the median
    round, and its ratio to the local folder's median."""
    import statistics
    from contextlib import ExitStack

    from launcher.data.mixing import train_shards
    from launcher.data.stream import ShardStream, StreamSettings
    from launcher.shards.format import load_index
    from launcher.shards.upload import complete_remote_set
    from launcher.testing.stores import environ, s3_server

    settings = StreamSettings(seed=0, batch_size=args.batch, shuffle_buffer=args.shuffle_buffer, verify=True,
                              prefetch=args.prefetch)

    def measure_at(where, env: dict) -> dict:
        with environ(env):
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            stream = ShardStream(train_shards(load_index(where), args.split), labels, settings, rank=0, world_size=1)
            return measure(stream, workers, args.seconds, pin)

    with ExitStack() as stack:
        sources = {"local folder": (shards, {})}
        for latency in (0.0, args.latency_ms):
            env = stack.enter_context(s3_server(latency_s=latency / 1000))
            with environ(env):
                import s3fs

                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem().mkdir("bench")
                complete_remote_set(shards, "s3://bench/set")
            sources[f"s3:// (+{latency:g} ms a request)"] = ("s3://bench/set", env)
        rounds: dict[str, list[dict]] = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, (where, env) in sources.items():
                rounds[name].append(measure_at(where, env))
    rows = []
    for name, runs in rounds.items():
        rates = [r["samples_per_s"] for r in runs]
        middle = sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2]
        cpu = statistics.median(r["loader_cpu_ms_per_sample"] for r in runs)
        rows.append({"source": name, **middle, "samples_per_s": statistics.median(rates), "rounds": rates,
                     "loader_cpu_ms_per_sample": cpu})
    for row in rows[1:]:
        row["over_local"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        row["cpu_over_local"] = row["loader_cpu_ms_per_sample"] / rows[0]["loader_cpu_ms_per_sample"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, help="a folder from `launcher shard` (default: shard the bundled corpus)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--language", help="of the transcripts (default: the shards' index.json)")
    ap.add_argument("--n-mels", type=int, choices=(80, 128),
                    help="when sharding the bundled corpus (default: the train_throughput.json model's, else 80)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    ap.add_argument("--batch", type=int, default=16, help="clips per batch")
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per worker count")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--gpu-samples-per-s", type=float, help="one GPU's consumption (default: see above)")
    ap.add_argument("--node-workers", type=int, default=os.cpu_count(), help="workers for the projection")
    ap.add_argument("--remote", action=argparse.BooleanOptionalAction, default=True,
                    help="also read the shards from a loopback S3 server (needs s3fs and moto)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="added to every S3 request in the second row")
    ap.add_argument("--prefetch", type=int, default=2, help="remote shards fetched ahead per worker")
    ap.add_argument("--remote-workers", type=int, default=1, help="loader workers for the remote rows")
    ap.add_argument("--rounds", type=int, default=9, help="remote rows: rounds of (local, s3, s3 + latency)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import WhisperTokenizer

    from launcher.data.labels import LabelEncoder
    from launcher.data.mixing import train_shards
    from launcher.data.stream import ShardStream, StreamSettings
    from launcher.shards.format import load_index
    from launcher.tiny_model import build_tiny_whisper

    torch.set_num_threads(1)  # a worker is one thread (DataLoader gives each worker one), so is the main process
    worker_counts = [int(w) for w in args.workers.split(",")]
    gpu_rate, gpu_source, train_n_mels = gpu_consumption(args)
    pin = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards
        if shards is None:
            shards = shard_demo(tmp / "shards", args.n_mels or train_n_mels or 80)
        index = load_index(shards)
        language = args.language or index.language or "fr"
        tokenizer = WhisperTokenizer.from_pretrained(build_tiny_whisper(tmp / "tiny"))
        labels = LabelEncoder(tokenizer, language, "transcribe", normalize=False)
        split = index.data["splits"][args.split]
        rows = []
        for workers in worker_counts:
            settings = StreamSettings(seed=0, batch_size=args.batch, shuffle_buffer=args.shuffle_buffer, verify=True)
            stream = ShardStream(train_shards(index, args.split), labels, settings, rank=0, world_size=1)
            row = measure(stream, workers, args.seconds, pin)
            row["ratio_vs_one_gpu"] = row["samples_per_s"] / gpu_rate
            rows.append(row)
        remote_rows = remote(args, shards, labels, args.remote_workers, pin) if args.remote else []

    # per-worker rate at the most workers measured: it includes their contention for cores and memory bandwidth
    widest = max(rows, key=lambda r: r["workers"])
    best = widest["samples_per_s_per_worker"]
    projected = best * args.node_workers
    result = {
        "benchmark": "loader_throughput", "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "pin_memory": pin,
        "shards": str(args.shards or f"bundled corpus {DEMO_CORPUS.relative_to(REPO)}, sharded now"),
        "split": args.split, "samples_in_split": split["samples"], "mean_clip_seconds": split["seconds"] /
        split["samples"], "n_mels": index.n_mels, "batch": args.batch, "rows": rows,
        "gpu_samples_per_s": gpu_rate, "gpu_source": gpu_source, "projection_from_workers": widest["workers"],
        "samples_per_s_per_worker_for_projection": best,
        "node_workers": args.node_workers, "projected_ratio_vs_one_gpu": projected / gpu_rate,
        "workers_to_keep_up": gpu_rate / best, "workers_for_10x": 10 * gpu_rate / best,
        "targets": {"ratio_vs_one_gpu": ">= 10", "remote_over_local": ">= 0.9"},
        "remote_rows": remote_rows, "remote_prefetch": args.prefetch, "latency_ms": args.latency_ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['shards']}: split {args.split}, {split['samples']} clips "
          f"(mean {result['mean_clip_seconds']:.2f} s), {result['n_mels']} mel bins, batch {args.batch} -> "
          f"{rows[0]['batch_shape']}, pin_memory {pin}")
    print(f"one GPU consumes {gpu_rate:.2f} samples/s ({gpu_source})")
    print(f"{'workers':>8}{'start-up s':>12}{'samples/s':>11}{'per worker':>12}{'x one GPU':>11}")
    for r in rows:
        print(f"{r['workers']:>8}{r['startup_s']:>12.2f}{r['samples_per_s']:>11.1f}{r['samples_per_s_per_worker']:>12.1f}"
              f"{r['ratio_vs_one_gpu']:>11.1f}")
    print(f"projection: {args.node_workers} workers x {best:.1f} samples/s per worker (as measured with "
          f"{widest['workers']}) = {projected:.0f} samples/s = {projected / gpu_rate:.1f}x one GPU (target >= 10x); "
          f"{gpu_rate / best:.3g} workers keep up with it, {10 * gpu_rate / best:.3g} give 10x")
    for r in remote_rows:
        print(f"{r['source']:>28}: {r['samples_per_s']:.1f} samples/s with {r['workers']} workers (median of "
              f"{', '.join(f'{x:.0f}' for x in r['rounds'])})"
              + (f", {r['over_local']:.2f} of the local folder's" if "over_local" in r else "")
              + f"; the loader's CPU {r['loader_cpu_ms_per_sample']:.2f} ms a sample"
              + (f" ({r['cpu_over_local']:.2f}x the folder's)" if "cpu_over_local" in r else ""))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
