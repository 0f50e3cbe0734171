"""`python -m launcher <command>`: the verbs mirror what a user does (shard, inspect, demo, ...)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.errors import LauncherError


def _shard(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from launcher.features import SUPPORTED_N_MELS
    from launcher.shard import Settings, shard_corpus
    from launcher.sources import open_source

    if args.n_mels not in SUPPORTED_N_MELS:
        raise LauncherError(f"--n-mels must be 80 (Whisper v1/v2) or 128 (large-v3), got {args.n_mels}")
    if args.shard_size <= 0:
        raise LauncherError(f"--shard-size must be a positive number of MB, got {args.shard_size}")
    out = Path(args.out or f"shards/{args.lang}")
    source = open_source(args.source, args.lang, hf_config=args.hf_config, audio_column=args.audio_column,
                         text_column=args.text_column)
    settings = Settings(n_mels=args.n_mels, shard_bytes=int(args.shard_size * 1e6), language=args.lang)
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
               TextColumn("{task.fields[hours]:.2f} h audio"), TextColumn("{task.fields[speed]:.0f}x real time"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        index = shard_corpus(source, out, settings, workers=args.workers, overwrite=args.overwrite,
                             splits=args.splits.split(",") if args.splits else None, progress=progress)
    _print_summary(console, out, index)
    return 0


def _print_summary(console, out: Path, index: dict) -> None:
    from rich.table import Table

    table = Table("split", "samples", "hours", "shards", "MB", "dropped", title=f"shards in {out}")
    for name, split in index["splits"].items():
        table.add_row(name, f"{split['samples']:,}", f"{split['seconds'] / 3600:.3f}", str(len(split["shards"])),
                      f"{sum(s['bytes'] for s in split['shards']) / 1e6:.1f}", str(split["dropped"]))
    console.print(table)
    dropped = index["dropped"]
    if dropped:
        console.print(f"[yellow]dropped {sum(dropped.values())} clip(s)[/]: "
                      + ", ".join(f"{reason} {n}" for reason, n in dropped.items())
                      + f"; each is listed with its reason in {out / 'dropped.jsonl'}")
    console.print(f"index: {out / 'index.json'}")


def _inspect(args: argparse.Namespace) -> int:
    from launcher.index import inspect

    return 1 if inspect(Path(args.shards), verify=args.verify) else 0


def _demo(args: argparse.Namespace) -> int:
    from launcher.demo import run_demo

    return run_demo(Path(args.out), workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shard", help="corpus -> Whisper log-mel WebDataset shards",
                       description="Decode, resample to 16 kHz, compute Whisper log-mel once and write WebDataset "
                                   "tar shards plus index.json; bad clips are dropped and listed in dropped.jsonl. "
                                   "A rerun resumes: finished shards are verified by sha256 and kept.")
    p.add_argument("--lang", required=True, help="language code, e.g. fr (Common Voice locale)")
    p.add_argument("--source", help="cv11 (default: Common Voice 11 on the Hub, needs HF_TOKEN), cv-hub:LOCATION, "
                                    "cv:PATH, hf:NAME_OR_PATH, manifest:FILE.jsonl, or a path recognised by content")
    p.add_argument("--out", help="output folder (default: shards/<lang>)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="feature processes (default: all cores; 0 runs in this process)")
    p.add_argument("--shard-size", type=float, default=256.0, help="target shard size in MB (default: 256)")
    p.add_argument("--n-mels", type=int, default=80, help="80 for Whisper v1/v2 models, 128 for large-v3")
    p.add_argument("--splits", help="comma-separated subset of train,validation,test (default: all present)")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    p.add_argument("--hf-config", help="configuration (subset) of a Hugging Face dataset source")
    p.add_argument("--audio-column", help="audio column of a Hugging Face dataset (default: its Audio feature)")
    p.add_argument("--text-column", help="text column of a Hugging Face dataset (default: sentence, text, ...)")
    p.set_defaults(func=_shard)

    p = sub.add_parser("inspect", help="summarise shards; --verify checks every sha256")
    p.add_argument("shards", help="folder holding index.json, e.g. shards/fr")
    p.add_argument("--verify", action="store_true", help="check every shard's size and sha256 against index.json")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("demo", help="the whole flow on the small bundled corpus, on the CPU")
    p.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
