"""The checks of what a run reads and writes on this machine: the model (local folder or hub cache), every shard
set (present, sizes, sha256 when asked), and free disk for the checkpoints the recipe keeps."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from launcher.doctor.checks import Check
from launcher.errors import LauncherError
from launcher.recipe.checks import check_against_data_and_model, load_model_config
from launcher.recipe.schema import Recipe

OPTIMIZER_STATE_BYTES = 12  # per trainable parameter: fp32 master weights and Adam's two moments
DISK_MARGIN = 1.5  # less free space than this times the estimate is a warning
SHARDS_FIX = ("the shards must be at data.shards, the same on every node: copy them or reshard "
              "(`python -m launcher shard ...`), then `python -m launcher inspect DIR --verify`")


# ---- the model ----------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _missing_files(has: Callable[[str], bool]) -> list[str]:
    """What of the files WhisperProcessor.from_pretrained and the model's from_pretrained read is missing."""
    missing = []
    if not (has("preprocessor_config.json") or has("processor_config.json")):  # transformers 5 writes the latter
        missing.append("preprocessor_config.json")
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        missing.append("tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    if not any(has(w) for w in WEIGHT_FILES):
        missing.append("weights (model.safetensors, pytorch_model.bin or their .index.json)")
    return missing


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_model(recipe: Recipe) -> tuple[Check, dict | None]:
    """The model's config.json loads (local folder or hub) and is Whisper's; a local folder has what the
    processor and the weights need. A hub model is read from the cache when there; offline, it must be there."""
    name = recipe.model.name_or_path
    local = Path(name).exists()
    if not local and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        return Check("model", "FAIL", f"no folder {name} (relative to {Path.cwd()}), and not a hub id",
                     "point model.name_or_path at a Hugging Face folder or a hub id"), None
    try:
        config = load_model_config(name)
    except LauncherError as e:
        fix = ("download it where HF_HOME points (`huggingface-cli download " + name + "`), or unset HF_HUB_OFFLINE"
               if not local and _hub_offline() else "check model.name_or_path (and HF_TOKEN for a gated model)")
        return Check("model", "FAIL", str(e), fix), None
    found = (f"{name}: {config.get('model_type')}, d_model {config.get('d_model')}, "
             f"{config.get('encoder_layers')}+{config.get('decoder_layers')} layers")
    if config.get("model_type") != "whisper":
        return Check("model", "FAIL", f"{found}: not a Whisper model",
                     "point model.name_or_path at a Whisper model"), None
    if local:
        missing = _missing_files(lambda f: (Path(name) / f).is_file())
        if missing:
            return Check("model", "FAIL", f"{found}; the folder has no {'; no '.join(missing)}",
                         "save the processor next to the weights (WhisperProcessor.from_pretrained(BASE)"
                         f".save_pretrained('{name}'))"), config
        return Check("model", "OK", f"{found}; processor and weights present"), config
    from huggingface_hub import try_to_load_from_cache

    missing = _missing_files(lambda f: isinstance(try_to_load_from_cache(name, f), str))
    if missing and _hub_offline():
        return Check("model", "FAIL", f"{found}; HF_HUB_OFFLINE is set and the cache has no {'; no '.join(missing)}",
                     f"`huggingface-cli download {name}` into the HF_HOME every node reads"), config
    if missing:
        return Check("model", "WARN", f"{found}; not fully in the local cache: every node downloads it at start",
                     f"`huggingface-cli download {name}` first, into an HF_HOME every node reads"), config
    return Check("model", "OK", f"{found}; in the local Hugging Face cache"), config


# ---- shards -------------------------------------------------------------------------------------------------

def _splits_read(recipe: Recipe, index) -> list[str]:
    """The splits a run reads: train, the eval splits, and test at the end when the recipe scores it."""
    wanted = [recipe.data.train_split, *recipe.eval.splits, *(["test"] if recipe.eval.test_at_end else [])]
    return [s for s in dict.fromkeys(wanted) if index.has_split(s)]


def _first_bytes(shard) -> None:
    """Read the first bytes of a remote shard, or raise a LauncherError naming the missing credential or the
    unreachable address."""
    from launcher.shards.location import explain, filesystem

    try:
        filesystem(shard.url).cat_file(shard.url, start=0, end=512)  # one small ranged read, not the whole shard
    except Exception as e:  # noqa: BLE001 - one line naming the cause
        raise LauncherError(explain(shard.url, e)) from None


def check_shards(recipe: Recipe, verify: bool = False) -> Check:
    """check_against_data_and_model passes (a model that does not load is the model check's line, not repeated
    here), and every shard of the splits the run reads, in every shard set, exists with the index's size (and
    sha256 with verify)."""
    from launcher.shards import fetch
    from launcher.shards.format import load_index

    problems = []
    try:
        check_against_data_and_model(recipe)
    except LauncherError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        problems = [line for line in lines if line and not re.fullmatch(r"\d+ problem\(s\):", line)
                    and not line.startswith("model.name_or_path:")]
    indexes, wrong, found, total = [], [], [], 0
    for entry in recipe.data.shard_sets:
        try:
            index = load_index(entry.path)
        except LauncherError:
            continue  # check_against_data_and_model's problems name it
        indexes.append(index)
        splits = _splits_read(recipe, index)
        shards = [shard for split in splits for shard in index.shards(split)]
        total += len(shards)
        if index.location.remote and not verify:
            # its index.json was read; the first bytes of one shard say the shards can be too (each shard's size and
            # sha256 only with --verify, which fetches every one)
            first = next((s for s in shards if s.samples), None)
            try:
                if first is not None:
                    _first_bytes(first)
            except LauncherError as e:
                problems.append(str(e))
        else:  # a remote set's shards fetched and hashed, as `inspect --verify` does
            wrong += [f"{index.relative(shard)} {p}" for shard in shards if (p := fetch.problem(shard, hash_it=verify))]
        counts = ", ".join(f"{s} {index.samples(s)} clips in {len(index.shards(s))} shard(s)" for s in splits)
        found.append(f"{index.folder}: {counts}")
    if not indexes:
        return Check("shards", "FAIL", "; ".join(problems), SHARDS_FIX)
    bad = (f"{len(wrong)} of {total} shard files wrong: " + "; ".join(wrong[:5])
           + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")) if wrong else None
    where = ", ".join(str(index.folder) for index in indexes)
    if problems or (bad and recipe.data.on_bad_data == "stop"):
        return Check("shards", "FAIL", f"{where}: " + "; ".join([*problems, *filter(None, [bad])]), SHARDS_FIX)
    if bad:  # the recipe says to train on without them: they will be skipped, named and counted
        return Check("shards", "WARN", f"{where}: {bad}; their samples will be skipped (data.on_bad_data: skip)",
                     SHARDS_FIX)
    how = "sizes and sha256" if verify else "the index's sizes (sha256 not checked: --verify)"
    return Check("shards", "OK", "; ".join(found) + f"; all {total} files present with {how}")


# ---- disk ---------------------------------------------------------------------------------------------------

def checkpoint_bytes(recipe: Recipe, n_params: int, n_trainable: int) -> int:
    """One DeepSpeed checkpoint: the 16-bit (or fp32) weights plus fp32 master weights and Adam moments."""
    weight = 4 if recipe.deepspeed.precision == "fp32" else 2
    return weight * n_params + OPTIMIZER_STATE_BYTES * n_trainable


def disk_needed(recipe: Recipe, n_params: int, n_trainable: int) -> tuple[int, str]:
    """Bytes the run's folder grows to: the kept checkpoints and one being written, plus best/ and final/."""
    kept = recipe.checkpoint.keep_last + recipe.checkpoint.keep_best + 1
    one = checkpoint_bytes(recipe, n_params, n_trainable)
    export = (4 if recipe.deepspeed.precision == "fp32" else 2) * n_params
    how = (f"{kept} checkpoints x {one / 1e9:.2f} GB (keep_last {recipe.checkpoint.keep_last} + keep_best "
           f"{recipe.checkpoint.keep_best} + 1 being written) + best/ and final/ x {export / 1e9:.2f} GB")
    return kept * one + 2 * export, how


def _free_bytes(path: Path) -> tuple[int, Path]:
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free, existing


def check_disk(recipe: Recipe, params: tuple[int, int] | None, free_bytes: int | None = None) -> Check:
    """Free space where output_dir lives against the checkpoints the recipe keeps; `free_bytes` overrides
    the filesystem's answer (tests, or a quota the filesystem does not report)."""
    if params is None:
        return Check("disk", "SKIP", "model size unknown (its config did not load)")
    needed, how = disk_needed(recipe, *params)
    free, where = _free_bytes(recipe.output_dir) if free_bytes is None else (free_bytes, Path(recipe.output_dir))
    found = f"{recipe.output_dir}: needs ~{needed / 1e9:.2f} GB ({how}), {free / 1e9:.2f} GB free on {where}"
    fix = "free space, point output_dir at a larger filesystem, or lower checkpoint.keep_last / keep_best"
    if free < needed:
        return Check("disk", "FAIL", found, fix)
    if free < DISK_MARGIN * needed:
        return Check("disk", "WARN", f"{found} (less than {DISK_MARGIN}x)", fix)
    return Check("disk", "OK", found)
