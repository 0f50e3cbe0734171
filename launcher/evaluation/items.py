"""What an evaluation decodes: a split's clips, with where each one's features lie in its shard."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LauncherError
from launcher.shards.fetch import ShardFetcher
from launcher.shards.format import ShardIndex
from launcher.shards.reader import BadShard, MelRef, read_samples


@dataclass(frozen=True)
class EvalItem:
    id: str
    text: str
    seconds: float
    mel: MelRef
    speaker: str | None = None  # when the source names one: long-form joins only one speaker's clips


_FETCHER: ShardFetcher | None = None


def _fetcher() -> ShardFetcher:
    """Evaluation's copies of remote shards: fetched once (checked against their sha256), kept while the process
    lives, since a run evaluates the same split again and again."""
    global _FETCHER
    if _FETCHER is None:
        folder = Path(tempfile.mkdtemp(prefix="launcher-eval-shards-"))
        _FETCHER = ShardFetcher(folder, prefetch=0)  # a cache, unbounded: the split's copies stay found
        atexit.register(shutil.rmtree, folder, True)
        atexit.register(_FETCHER.close)
    return _FETCHER


def scan_split(index: ShardIndex, split: str, max_samples: int | None = None) -> list[EvalItem]:
    """The split's samples in index order (the first `max_samples`), with where each one's features lie (a remote
    set's shards are fetched first). Reads the tars' headers and JSON once; callers keep the list for every
    evaluation of a run."""
    items: list[EvalItem] = []
    for shard in index.shards(split):
        try:
            for sample in read_samples(_fetcher().local(shard), load_mel=False):
                meta = json.loads(sample.meta)
                items.append(EvalItem(meta["id"], meta["text"], meta["seconds"], sample.mel_ref,
                                      meta.get("speaker")))
                if max_samples and len(items) >= max_samples:
                    return items
        except (BadShard, ValueError, KeyError, TypeError) as e:  # reported by shard, never half-scored
            raise LauncherError(f"cannot read evaluation shard {shard.path}: {type(e).__name__}: {e}") from None
    return items
