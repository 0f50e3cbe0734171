"""The checks a recipe needs the data and the model for: every shard set's index.json (splits, n_mels, language)
against the model's config, all problems at once, before any process group starts."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import LauncherError
from launcher.features import FRAMES_PER_SECOND
from launcher.recipe.schema import Recipe


def load_model_config(name_or_path: str) -> dict:
    """The model's config.json as a dict: read directly from a local folder (no transformers import, so a bad
    recipe fails in well under a second), fetched alone from the Hub otherwise."""
    local = Path(name_or_path) / "config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text(encoding="utf-8"))
        if Path(name_or_path).exists():
            raise FileNotFoundError(f"{local} does not exist")
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "config.json")).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any loading failure is reported with the field that caused it
        first = str(e).splitlines()[0] if str(e) else ""
        raise LauncherError(f"model.name_or_path: cannot load a Whisper config from {name_or_path!r} "
                            f"({type(e).__name__}: {first})") from None


def whisper_language_code(language: str) -> str | None:
    """'fr' or 'french' -> 'fr' (Whisper accepts both); None for a language Whisper does not know."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    language = language.lower()
    return language if language in LANGUAGES else TO_LANGUAGE_CODE.get(language)


def check_against_data_and_model(recipe: Recipe):
    """Cross-checks that need index.json and the model's config; returns the run's shard sets (`LanguageSet`s:
    index, language, weight) and the config dict, read once for the whole run. All problems at once, each set's
    named by its place in data.shards."""
    from launcher.data.mixing import LanguageSet
    from launcher.model import input_frames
    from launcher.shards.format import load_index

    problems, sets, config = [], [], None
    try:
        config = load_model_config(recipe.model.name_or_path)
    except LauncherError as e:
        problems.append(str(e))
    several = len(recipe.data.shard_sets) > 1
    for i, entry in enumerate(recipe.data.shard_sets):
        field = f"data.shards[{i}]" if several else "data.shards"
        try:
            index = load_index(entry.path)
        except LauncherError as e:
            problems.append(f"{field}: {e}")
            continue
        given, given_field = (entry.language, f"{field}.language") if several else (recipe.model.language,
                                                                                    "model.language")
        code = whisper_language_code(given) if given else None
        if given and code is None:
            problems.append(f"{given_field}: got {given!r}, expected one of Whisper's language codes (e.g. fr, de, "
                            f"es) or names")
        shards_language = index.language and whisper_language_code(index.language)
        if code and shards_language and shards_language != code:
            problems.append(f"{given_field}: got {given!r}, but the shards in {index.folder} are {index.language!r} "
                            f"(index.json, source.language): set it to {index.language}, or point {field} at "
                            f"{given} shards")
        language = code or shards_language
        if not given and index.language and not shards_language:
            problems.append(f"{field}: index.json's language {index.language!r} is not one of Whisper's; set "
                            f"{given_field}")
        elif not language:
            problems.append(f"{given_field}: missing, and index.json of {index.folder} names no language")
        for split_field, split in [("data.train_split", recipe.data.train_split),
                                   *((f"eval.splits[{k}]", s) for k, s in enumerate(recipe.eval.splits))]:
            if not index.has_split(split):
                problems.append(f"{split_field}: got {split!r}, expected one of the shards' splits in {index.folder} "
                                f"({', '.join(index.split_names)})")
        if index.has_split(recipe.data.train_split) and not index.samples(recipe.data.train_split):
            problems.append(f"{field}: split {recipe.data.train_split!r} of {index.folder} has no samples")
        if config is not None and index.n_mels != config.get("num_mel_bins"):
            problems.append(f"{field}: features in {index.folder} have n_mels={index.n_mels}, but model "
                            f"{recipe.model.name_or_path!r} expects num_mel_bins={config.get('num_mel_bins')}; "
                            f"reshard with --n-mels {config.get('num_mel_bins')}")
        if language:
            sets.append(LanguageSet(index, language, entry.weight))
    languages = [s.language for s in sets]
    if len(set(languages)) < len(languages):
        problems.append(f"data.shards: languages {languages}: one set per language (evaluation and the model card "
                        "report by language)")
    select = recipe.eval.select_by
    if several and select != "mean" and whisper_language_code(select) not in languages:
        problems.append(f"eval.select_by: got {select!r}, expected mean or one of the sets' languages "
                        f"({', '.join(languages)})")
    pack_seconds = recipe.data.pack.max_seconds
    if config is not None and pack_seconds and recipe.data.pack.enabled:
        window = input_frames(config) / FRAMES_PER_SECOND
        if pack_seconds > window:
            problems.append(f"data.pack.max_seconds: got {pack_seconds:g}, expected at most the model's input window "
                            f"({window:g} s)")
    if recipe.eval.every_steps and "test" in recipe.eval.splits:
        problems.append("eval.splits: periodic evaluation must not use the test split (it picks the best "
                        "checkpoint); test is scored once at the end")
    if problems:
        raise LauncherError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return sets, config
