"""Shard sets into object storage (`launcher shard --out URL`) and onto the Hugging Face Hub (`launcher publish`).

`shard --out s3://bucket/fr` writes the set into a local staging folder as always (resumable, byte-identical) and
sends each shard as soon as it is finished (`Uploader`, a background thread), then dropped.jsonl and, last,
index.json: a reader takes a set as whole only once its index.json exists, and by then every shard it names is
there with its size (object stores make an object visible only whole). A run killed midway leaves a set without
index.json; the same command again resumes the staging folder and sends only what the store lacks.

`publish` sends a finished set (a folder) to a dataset repository on the Hub with a dataset card: language, source and
its licence, feature settings, hours and clips per split, drops, each shard's sha256. `--dry-run` shows the files
and the card and sends nothing. Tokens come from where huggingface_hub looks (HF_TOKEN, the login cache).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from launcher.errors import LauncherError
from launcher.shards.format import DROPPED_FILE, INDEX_FILE, load_index
from launcher.shards.location import Location, explain

LICENCES = {"cv": "cc0-1.0", "cv-hub": "cc0-1.0", "cv11": "cc0-1.0"}  # Common Voice is released under CC0


class Uploader:
    """Sends finished shards of a set being written to `url`, in the background, in the order they finish."""

    def __init__(self, local: Path, url: str):
        self.local, self.where = Path(local), Location.of(url)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-upload", daemon=True)
        self._thread.start()

    def send(self, rel: str) -> None:
        """Queue the finished file `rel` (relative to the set's folder)."""
        if self._error is not None:
            raise self._error
        self._queue.put(rel)

    def _run(self) -> None:
        while (rel := self._queue.get()) is not None:
            try:
                put(self.local / rel, self.where, rel)
            except BaseException as e:  # noqa: BLE001 - raised in the writer's thread at its next send/finish
                self._error = e
                return

    def finish(self) -> None:
        """Every queued shard sent; then the files that make the set whole, index.json last."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        complete_remote_set(self.local, self.where.root)


def put(path: Path, where: Location, rel: str) -> None:
    """One file to the store, skipped when the store has it with its size already (a resumed upload)."""
    fs, url = where.fs, where.join(rel)
    size = path.stat().st_size
    try:
        if fs.exists(url) and fs.info(url).get("size") == size:
            return
        fs.put_file(str(path), url)
        if fs.info(url).get("size") != size:
            raise OSError(f"{url} holds {fs.info(url).get('size')} bytes after the upload, {path} has {size}")
    except Exception as e:  # noqa: BLE001 - one line naming the cause
        raise LauncherError(f"uploading {path}: {explain(url, e)}") from None


def complete_remote_set(local: Path, url: str) -> None:
    """Send a finished local set's files the store lacks, then dropped.jsonl, then index.json (last, after checking
    that every shard it names is there with its size)."""
    index, where = load_index(local), Location.of(url)
    for split in index.split_names:
        for shard in index.shards(split):
            rel = Path(shard.path).relative_to(local).as_posix()
            size = Path(shard.path).stat().st_size
            if shard.bytes is not None and size != shard.bytes:  # put checks the store holds the local file's size
                raise LauncherError(f"{shard.path} has {size} bytes, index.json says {shard.bytes}: not writing "
                                    "index.json")
            put(Path(shard.path), where, rel)
    if (local / DROPPED_FILE).is_file():
        put(local / DROPPED_FILE, where, DROPPED_FILE)
    put(local / INDEX_FILE, where, INDEX_FILE)


# ---- the Hub ---------------------------------------------------------------------------------------------------

def dataset_card(folder: Path) -> str:
    """A dataset card (huggingface_hub's DatasetCard: YAML metadata the Hub reads, then text) for a shard set."""
    from huggingface_hub import DatasetCard, DatasetCardData

    index = load_index(folder)
    source, features = index.source, index.data["features"]
    kind = str(source.get("kind", ""))
    licence = LICENCES.get(kind, "other")
    hours = {s: index.data["splits"][s]["seconds"] / 3600 for s in index.split_names}
    clips = {s: index.samples(s) for s in index.split_names}
    data = DatasetCardData(language=[index.language] if index.language else None, license=licence,
                           task_categories=["automatic-speech-recognition"],
                           tags=["whisper", "log-mel", "webdataset", "whisper-launcher"],
                           pretty_name=f"Whisper log-mel shards ({index.language or 'unknown language'})",
                           size_categories=[_size_category(sum(clips.values()))])
    rows = "\n".join(f"| {s} | {clips[s]:,} | {hours[s]:.2f} | {len(index.shards(s))} |" for s in index.split_names)
    sha = "\n".join(f"| {Path(sh.path).relative_to(folder).as_posix()} | {sh.samples} | {sh.bytes} | `{sh.sha256}` |"
                    for s in index.split_names for sh in index.shards(s))
    dropped = index.data.get("dropped") or {}
    text = f"""---
{data.to_yaml()}
---

# Whisper log-mel shards: {index.language or 'unknown language'}

Precomputed Whisper features of `{source.get('kind')}:{source.get('location')}` in the format of
[whisper-launcher](https://github.com/) (`{index.data['format']}`): WebDataset tars whose samples are `KEY.mel.npy`
(float16 log-mel, {features.get('n_mels')} bins, unpadded: only the frames the audio reaches) and `KEY.json` (id, text,
lang, seconds). Train on them with `data.shards: hf://datasets/OWNER/NAME` in a recipe.

Feature settings: {features.get('n_mels')} mel bins, {features.get('sampling_rate')} Hz, n_fft {features.get('n_fft')},
hop {features.get('hop_length')}, padded to {features.get('frames')} frames with `{features.get('padding')}`.

Licence: {licence} (the source's{'' if licence != 'other' else ': check the source corpus'}).

| split | clips | hours | shards |
| --- | --- | --- | --- |
{rows}

Dropped at sharding: {', '.join(f'{r} {n}' for r, n in sorted(dropped.items())) or 'none'}
(one line each in {DROPPED_FILE}).

| shard | clips | bytes | sha256 |
| --- | --- | --- | --- |
{sha}
"""
    return str(DatasetCard(text))


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def publish(folder: Path, repo: str, *, private: bool = False, dry_run: bool = False, out=print) -> list[Path]:
    """A finished shard set (a folder) to the dataset repository `repo`, with its card (README.md)."""
    from launcher.push import REPO_ID

    if not REPO_ID.match(repo):
        raise LauncherError(f"--repo: got {repo!r}, expected OWNER/NAME")
    folder = Path(folder)
    index = load_index(folder)
    files = sorted([folder / INDEX_FILE, *([folder / DROPPED_FILE] if (folder / DROPPED_FILE).is_file() else []),
                    *(Path(sh.path) for s in index.split_names for sh in index.shards(s))])
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise LauncherError(f"{folder} is not a whole shard set: missing {', '.join(missing[:3])}")
    card = dataset_card(folder)
    total = sum(p.stat().st_size for p in files)
    out(f"{'would upload' if dry_run else 'uploading'} {len(files)} files, {total / 1e6:.1f} MB, from {folder} to "
        f"https://huggingface.co/datasets/{repo}" + (" (private)" if private else ""))
    for p in files:
        out(f"  {p.relative_to(folder).as_posix()}  {p.stat().st_size / 1e6:.2f} MB")
    out("dataset card (README.md):")
    out(card)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                          allow_patterns=[p.relative_to(folder).as_posix() for p in files if p.name != INDEX_FILE])
        api.upload_file(path_or_fileobj=str(folder / INDEX_FILE), path_in_repo=INDEX_FILE, repo_id=repo,
                        repo_type="dataset")  # last: the set is whole once index.json is there
    except Exception as e:  # noqa: BLE001 - no token, no access, offline: one line
        raise LauncherError(f"publishing to {repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
    out(f"published: https://huggingface.co/datasets/{repo}")
    return files
