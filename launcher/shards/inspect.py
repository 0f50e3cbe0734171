"""`launcher inspect`: what a shard set holds, and (--verify) whether every shard matches its sha256."""

from __future__ import annotations

from pathlib import Path

from launcher.shards import fetch
from launcher.shards.format import DROPPED_FILE, load_index


def inspect(folder: Path | str, verify: bool = False) -> int:
    """Print splits, samples, hours, bytes per audio hour and drops; with verify, check every shard's sha256 (a remote
    set's shards are fetched to be hashed).
    Returns the number of bad shards."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    index = load_index(folder)
    console = Console()
    feats, src = index.data["features"], index.source
    console.print(f"[bold]{folder}[/]  {index.data['format']}  n_mels={feats.get('n_mels')}  "
                  f"source={src.get('kind')}:{src.get('location')}  language={src.get('language')}")
    table = Table("split", "samples", "hours", "shards", "MB", "MB per audio hour", "mean s/clip")
    for name, split in index.data["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        hours = split["seconds"] / 3600
        table.add_row(name, f"{split['samples']:,}", f"{hours:.3f}", str(len(split["shards"])), f"{size / 1e6:.1f}",
                      f"{size / 1e6 / hours:.1f}" if hours else "-",
                      f"{split['seconds'] / split['samples']:.2f}" if split["samples"] else "-")
    console.print(table)
    dropped = index.data.get("dropped", {})
    if dropped:
        console.print(f"dropped {sum(dropped.values())}: " + ", ".join(f"{r} {n}" for r, n in sorted(dropped.items()))
                      + f"  (one line each in {Path(folder) / DROPPED_FILE})")
    else:
        console.print("dropped: none")
    if not verify:
        return 0
    shards = [s for split in index.split_names for s in index.shards(split)]
    bad = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying sha256", total=sum(s.bytes or 0 for s in shards))
        for shard in shards:
            problem = fetch.problem(shard)
            if problem:
                bad.append((index.relative(shard), problem))
            progress.advance(task, shard.bytes or 0)
    for path, problem in bad:
        console.print(f"[red]BAD[/] {path}: {problem}")
    console.print(f"verified {len(shards)} shards: " + ("[green]all match index.json[/]" if not bad
                                                          else f"[red]{len(bad)} bad[/]"))
    return len(bad)
