"""`launcher demo`: the whole flow on the small bundled French corpus, on the CPU, in a few minutes."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "demo_corpus" / "fr"


def run_demo(out: Path, workers: int = 2) -> int:
    from launcher.cli import main as cli

    console = Console()
    shards = out / "shards"
    console.rule("[bold]1. shard[/] the bundled corpus (Common Voice layout, 3 deliberately bad rows)")
    rc = cli(["shard", "--lang", "fr", "--source", f"cv:{DEMO_CORPUS}", "--out", str(shards),
              "--workers", str(workers), "--shard-size", "0.5"])
    if rc:
        return rc
    console.rule("[bold]2. inspect[/] the shards and verify every sha256")
    rc = cli(["inspect", str(shards), "--verify"])
    console.rule("[bold]where everything went")
    console.print(f"shards:   {shards}/<split>/*.tar\nindex:    {shards / 'index.json'}\n"
                  f"dropped:  {shards / 'dropped.jsonl'}")
    return rc
