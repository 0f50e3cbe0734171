"""index.json, the shards' manifest: reading it (tolerantly), verifying shards, and `launcher inspect`.

Contract (format "whisper-shards/1"): `features` (n_mels, sampling_rate, n_fft, hop_length, dtype,
frames), `source` (what was read, language), `splits` (samples, seconds, shards: path relative to the
index's folder, samples, seconds, bytes, sha256), `dropped` (count by reason; dropped.jsonl lists them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from launcher.errors import LauncherError

FORMAT = "whisper-shards/1"
INDEX_FILE = "index.json"
DROPPED_FILE = "dropped.jsonl"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_index(shards_dir: Path) -> dict:
    """Read and check OUT/index.json; unknown extra keys are allowed (readers are tolerant)."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.is_file():
        raise LauncherError(f"{path} does not exist: run `python -m launcher shard` first, or point at the folder "
                            "that holds index.json")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LauncherError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LauncherError(f"{path}: format is {index.get('format') if isinstance(index, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    for key in ("features", "splits"):
        if not isinstance(index.get(key), dict):
            raise LauncherError(f"{path}: missing or malformed {key!r}")
    return index


def verify_shard(shards_dir: Path, shard: dict) -> str | None:
    """None if the shard file exists with the index's size and sha256, else what is wrong."""
    path = Path(shards_dir) / shard["path"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != shard["bytes"]:
        return f"size {path.stat().st_size} bytes, index says {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        return "sha256 does not match index.json"
    return None


def inspect(shards_dir: Path, verify: bool = False) -> int:
    """Print splits, samples, hours, bytes per audio hour and drops; with verify, check every shard's sha256.
    Returns the number of bad shards."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    index = load_index(shards_dir)
    console = Console()
    feats = index["features"]
    src = index.get("source", {})
    console.print(f"[bold]{shards_dir}[/]  {index['format']}  n_mels={feats.get('n_mels')}  "
                  f"source={src.get('kind')}:{src.get('location')}  language={src.get('language')}")
    table = Table("split", "samples", "hours", "shards", "MB", "MB per audio hour", "mean s/clip")
    for name, split in index["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        hours = split["seconds"] / 3600
        table.add_row(name, f"{split['samples']:,}", f"{hours:.3f}", str(len(split["shards"])), f"{size / 1e6:.1f}",
                      f"{size / 1e6 / hours:.1f}" if hours else "-",
                      f"{split['seconds'] / split['samples']:.2f}" if split["samples"] else "-")
    console.print(table)
    dropped = index.get("dropped", {})
    if dropped:
        console.print(f"dropped {sum(dropped.values())}: " + ", ".join(f"{r} {n}" for r, n in sorted(dropped.items()))
                      + f"  (one line each in {Path(shards_dir) / DROPPED_FILE})")
    else:
        console.print("dropped: none")
    if not verify:
        return 0
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    bad = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying sha256", total=sum(s["bytes"] for s in shards))
        for shard in shards:
            problem = verify_shard(shards_dir, shard)
            if problem:
                bad.append((shard["path"], problem))
            progress.advance(task, shard["bytes"])
    for path, problem in bad:
        console.print(f"[red]BAD[/] {path}: {problem}")
    console.print(f"verified {len(shards)} shards: " + ("[green]all match index.json[/]" if not bad
                                                          else f"[red]{len(bad)} bad[/]"))
    return len(bad)
