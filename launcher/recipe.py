"""Recipes: a pydantic schema (extra keys forbidden everywhere), YAML loading, --set overrides, the
cross-field and environment checks, and the DeepSpeed config built from a recipe with concrete numbers.

Every error is collected and reported at once, each with its dotted path, the value given and what was
expected, before any process group starts: a typo costs seconds, not a queue wait and a crashed job.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.errors import LauncherError

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecAugment(Section):
    """Whisper's SpecAugment (time and feature masking), applied by the model in training only."""

    enabled: bool = False
    mask_time_prob: Probability = 0.05
    mask_time_length: PositiveInt = 10
    mask_feature_prob: Probability = 0.0
    mask_feature_length: PositiveInt = 10


class ModelSection(Section):
    name_or_path: str = Field(description="hub id (openai/whisper-large-v3) or a local Hugging Face folder")
    language: str | None = Field(None, description="language code of the transcripts, e.g. fr (default: the shards' "
                                                   "index.json); with several shard sets each set's own")
    train_language_token: bool | None = Field(
        None, description="learn the language token of the labels (Whisper's language detection reads it): default "
                          "false with one language, so detection is not taught that everything is that language; "
                          "true with several, so it learns the mix")
    task: Literal["transcribe", "translate"] = "transcribe"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    freeze_encoder: bool = False
    spec_augment: SpecAugment = SpecAugment()


class PackSection(Section):
    enabled: bool = Field(False, description="join consecutive training clips into windows of up to max_seconds "
                                             "(launcher/packing.py); evaluation stays on single clips")
    max_seconds: Annotated[float, Field(gt=0.0, le=30.0)] = 30.0
    same_speaker: bool = Field(False, description="join only clips of one speaker (the shards' speaker ids)")
    gap_seconds: Annotated[float, Field(ge=0.0, le=5.0)] = Field(0.2, description="silence between two clips")


class ShardSet(Section):
    path: Path = Field(description="folder holding index.json, from `launcher shard`")
    weight: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="this set's share of the mix, relative to the other sets' weights (all or none)")
    language: str | None = Field(None, description="default: index.json's language")


class DataSection(Section):
    shards: Path | list[ShardSet] = Field(
        description="folder holding index.json (from `launcher shard`), or a list of {path, weight, language}: one "
                    "set per language, mixed in each epoch by weight (launcher/mixing.py)")
    mix_temperature: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="instead of weights: each set's share proportional to its size^(1/T) (T=1: as the sizes; "
                          "larger T lifts the small sets)")
    train_split: str = "train"
    batch_size_per_gpu: PositiveInt
    num_workers: NonNegInt = 2
    shuffle: bool = True
    shuffle_buffer: PositiveInt = 1000
    target_text: Literal["as_is", "normalized"] = Field(
        "as_is", description="as_is: the source sentence; normalized: lower-case, punctuation removed "
                             "(word-internal apostrophes and hyphens kept)")
    verify_shards: bool = Field(True, description="check each shard's sha256 against index.json before reading it")
    on_bad_data: Literal["skip", "stop"] = Field(
        "skip", description="a shard failing its sha256, a truncated tar or an unreadable sample: skip it (named "
                            "in the log, counted) or stop the run")
    pack: PackSection = PackSection()
    timestamp_probability: Probability = Field(
        0.0, description="share of training samples whose labels carry each clip's start and end timestamps "
                         "(Whisper's timestamp tokens) instead of <|notimestamps|>; keeps timestamp prediction")
    prompt_probability: Probability = Field(
        0.0, description="share of training samples given the previous sample's text as a <|startofprev|> prompt "
                         "(not learned), as Whisper conditions on earlier text in long-form decoding")

    @property
    def shard_sets(self) -> list[ShardSet]:
        """The sets as a list, one folder being one set."""
        return [ShardSet(path=self.shards)] if isinstance(self.shards, Path) else list(self.shards)


class OptimSection(Section):
    lr: Annotated[float, Field(gt=0.0)]
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: NonNegInt = 0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0.0)] = 1.0
    max_steps: PositiveInt
    grad_accum: PositiveInt = 1
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    max_consecutive_nonfinite: PositiveInt = Field(
        3, description="a non-finite loss on any rank skips that step on every rank; this many in a row stop the run")


class DeepSpeedSection(Section):
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    timeout_minutes: Annotated[float, Field(gt=0.0)] = Field(
        30.0, description="process-group timeout: a hung or dead rank ends the job after this long")


class EvalSection(Section):
    every_steps: NonNegInt = Field(0, description="0: no periodic evaluation")
    splits: list[str] = ["validation"]
    max_samples: PositiveInt | None = None
    batch_size_per_gpu: PositiveInt = Field(
        32, description="clips decoded at once per GPU: generation keeps no activations for a backward pass, so it "
                        "takes larger batches than training")
    max_new_tokens: Annotated[int, Field(ge=1, le=444)] = 225
    num_beams: PositiveInt = 1
    select_by: str = Field("mean", description="which WER picks the best checkpoint with several languages: mean "
                                               "(of the languages' WERs) or a language code")
    test_at_end: bool = Field(True, description="score the delivered model on the test split and write its card")
    long_form_seconds: Annotated[float, Field(gt=0)] | None = Field(
        None, description="also score each eval split (and test at the end) on recordings of up to this many seconds "
                          "joined from one speaker's clips, decoded long-form (wer_long); the best checkpoint is still "
                          "chosen by clip WER")


class CheckpointSection(Section):
    every_steps: NonNegInt = Field(0, description="0: only at the end")
    keep_last: PositiveInt = 2
    keep_best: NonNegInt = 1


class LoggingSection(Section):
    every_steps: PositiveInt = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    sample_ids: bool = Field(False, description="write the ids of every trained sample to samples/rank-R.jsonl")
    verbose: bool = Field(False, description="let DeepSpeed, transformers and torch print their INFO lines and "
                                             "progress bars (on every rank)")


class Recipe(Section):
    model: ModelSection
    data: DataSection
    optim: OptimSection
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    seed: int = 42
    output_dir: Path

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        errors = []
        max_steps = self.optim.max_steps
        if self.optim.warmup_steps >= max_steps:
            errors.append(("optim.warmup_steps", self.optim.warmup_steps, f"fewer than optim.max_steps ({max_steps})"))
        for field, value in (("eval.every_steps", self.eval.every_steps),
                             ("checkpoint.every_steps", self.checkpoint.every_steps),
                             ("logging.every_steps", self.logging.every_steps)):
            if value > max_steps:
                errors.append((field, value, f"at most optim.max_steps ({max_steps}), or it never happens"))
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            errors.append(("deepspeed.offload_params", True, "only with deepspeed.zero_stage: 3"))
        if self.checkpoint.keep_best and self.eval.every_steps == 0:
            errors.append(("checkpoint.keep_best", self.checkpoint.keep_best,
                           "0 when eval.every_steps is 0 (best by WER needs periodic evaluation)"))
        sets = self.data.shard_sets
        if len(sets) > 1 and self.model.language:
            errors.append(("model.language", self.model.language, "unset with several shard sets (each set's language "
                           "is its index.json's or its `language`)"))
        if len(sets) == 1 and (sets[0].weight is not None or self.data.mix_temperature is not None):
            errors.append(("data.shards", str(sets[0].path), "several sets for a weight or data.mix_temperature"))
        weighted = [s.weight is not None for s in sets]
        if len(sets) > 1 and any(weighted) and not all(weighted):
            errors.append(("data.shards", [s.weight for s in sets], "a weight for every set, or none"))
        if any(weighted) and self.data.mix_temperature is not None:
            errors.append(("data.mix_temperature", self.data.mix_temperature, "unset when the sets have weights"))
        paths = [str(s.path) for s in sets]
        if len(set(paths)) < len(paths):
            errors.append(("data.shards", paths, "each folder once"))
        if self.logging.wandb and not self.logging.wandb_project:
            errors.append(("logging.wandb_project", None, "a project name when logging.wandb is true"))
        if errors:
            raise ValueError(json.dumps(errors))
        return self


# ---- loading and error reporting ------------------------------------------------------------------------------

def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _format_errors(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors(include_url=False):
        if err["type"] == "value_error" and err["msg"].startswith("Value error, ["):
            for path, value, expected in json.loads(err["msg"][len("Value error, "):]):
                lines.append(f"{path}: got {value!r}, expected {expected}")
            continue
        path = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _fields_at(err["loc"])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"{path}: unknown key ({hint}known here: {', '.join(known)})")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing, required")
        else:
            lines.append(f"{path}: got {err['input']!r}, expected {err['msg'].lower()}")
    return lines


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set optim.lr=1e-5 model.freeze_encoder=true`: each value is read as YAML (numbers, booleans, lists)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LauncherError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set optim.lr=1e-5")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LauncherError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    return raw


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raises LauncherError listing every problem at once."""
    path = Path(path)
    if not path.is_file():
        raise LauncherError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LauncherError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise LauncherError(f"{path}: a recipe is a mapping of sections (model, data, optim, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = _format_errors(e)
        raise LauncherError(f"{path}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)


# ---- checks against the data and the model -------------------------------------------------------------------

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
    from launcher.mixing import LanguageSet
    from launcher.shards import load_index

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
    if recipe.eval.every_steps and "test" in recipe.eval.splits:
        problems.append("eval.splits: periodic evaluation must not use the test split (it picks the best "
                        "checkpoint); test is scored once at the end")
    if problems:
        raise LauncherError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return sets, config


# ---- DeepSpeed --------------------------------------------------------------------------------------------------

def deepspeed_config(recipe: Recipe, world_size: int, *, on_gpu: bool, nodes: int = 1,
                     d_model: int | None = None) -> dict:
    """The DeepSpeed config, every number concrete (no "auto"): optimizer, schedule, ZeRO, precision.

    - Optimizer: torch's AdamW (`torch_adam`, which DeepSpeed passes through), fused on the GPU. DeepSpeed's own
      FusedAdam and CPUAdam are compiled on first use (nvcc and a CUDA toolkit matching torch's, or a C++
      compiler), which a cluster node often lacks; with `offload_optimizer` torch's AdamW steps on the CPU copy.
    - bf16 accumulates gradients in fp32 (`grad_accum_dtype`): summing many micro-batches in bf16 loses bits.
    - Buckets: bigger on several nodes, where each message pays a network latency; under ZeRO-3 sized from the
      model width (`d_model`) as the Hugging Face integration does, else DeepSpeed-sized defaults.
    """
    o, d = recipe.optim, recipe.deepspeed
    bucket = 200_000_000 if nodes > 1 else 50_000_000
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if d.zero_stage == 3:
        width = d_model or 1024
        zero.update({"reduce_bucket_size": max(bucket, width * width),
                     "stage3_prefetch_bucket_size": int(0.9 * max(bucket, width * width)),
                     "stage3_param_persistence_threshold": 10 * width,
                     "stage3_gather_16bit_weights_on_model_save": True})
        zero.pop("allgather_bucket_size")
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    warmup = max(o.warmup_steps, 1)  # DeepSpeed's schedulers refuse 0; one step of warmup is none to speak of
    if o.schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                         "warmup_num_steps": warmup, "warmup_type": "linear",
                                                         "total_num_steps": o.max_steps}}
    elif o.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": o.max_steps, "warmup_num_steps": warmup,
                                                          "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0,
                                                          "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}}
    micro = recipe.data.batch_size_per_gpu
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": micro * o.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                   "weight_decay": o.weight_decay, "torch_adam": True,
                                                   **({"fused": True} if on_gpu and not d.offload_optimizer else {})}},
        "zero_force_ds_cpu_optimizer": False,  # with offload_optimizer: torch's AdamW on the CPU, nothing compiled
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if d.precision == "bf16" else {}),
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1_000_000_000,  # the launcher logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
        "seed": recipe.seed,
    }


# ---- the memory estimate ---------------------------------------------------------------------------------------

CPU_RANK_BASELINE_GIB = 0.45  # a CPU rank's RSS before any of the model's tensors: see memory_estimate
_PARAMETER_COUNTS: dict[str, tuple[int, int]] = {}


def _parameter_counts(config) -> tuple[int, int]:
    """(all, encoder) parameters of a WhisperConfig, counted on the meta device (no memory, no weights read)."""
    key = config.to_json_string()
    if key not in _PARAMETER_COUNTS:
        import torch
        from transformers import WhisperForConditionalGeneration

        with torch.device("meta"):
            model = WhisperForConditionalGeneration(config)
        _PARAMETER_COUNTS[key] = (sum(p.numel() for p in model.parameters()),
                                  sum(p.numel() for p in model.model.encoder.parameters()))
    return _PARAMETER_COUNTS[key]


def memory_estimate(recipe: Recipe, config_dict: dict, world_size: int, *, on_gpu: bool = True,
                    label_tokens: int = 224) -> dict[str, float]:
    """GiB per rank, to choose ZeRO stage, offload, checkpointing and batch before queueing a job: one GPU's
    memory (`on_gpu`, what torch.cuda.max_memory_allocated reports), or a CPU rank's peak RSS.

    Ψ parameters, Ψt trainable (the encoder's left out when frozen), w ranks; every term counts what DeepSpeed
    0.19 and transformers' Whisper actually allocate for the config `deepspeed_config` builds:

    - weights: the model's own copy, 2Ψ in bf16/fp16, 4Ψ in fp32 (÷ w under ZeRO-3, plus the weights it gathers
      ahead of use, `stage3_prefetch_bucket_size`; only those with offload_params).
    - optimizer: fp32 master weights 4Ψt/w, a clone even in fp32 (so an fp32 run holds its weights twice), and
      Adam's two fp32 moments 8Ψt/w; none on the GPU when offloaded (`offloaded_gib`: the host's share).
    - gradients: the gradient partition in the accumulation dtype, 4Ψt/w in fp32 and in bf16 (accumulated in
      fp32: `data_types.grad_accum_dtype`), 2Ψt/w in fp16; plus the buffers every gradient passes through on its
      way there: ZeRO-2's two `reduce_bucket_size` buckets (overlap_comm), ZeRO-3's one, in the weights' dtype. On
      the GPU a bucket counts whole; on the CPU only the pages written count (all trainable gradients, at most the
      buckets' size).
    - activations: what the forward pass keeps for the backward pass, per sample, in the activation dtype (2 or 4
      bytes), h = d_model, f = FFN width, S = 1500 encoder positions, T = `label_tokens`: the conv stem 5·S·h +
      2·S·n_mels; per encoder layer (9 + 2f/h)·S·h (layer-norm inputs and outputs, q, k, v, the attention output
      and its copy, two FFN tensors of f); per decoder layer (14 + 2f/h)·T·h plus the cross-attention's keys and
      values of the whole encoder output, 2·S·h, the bulk of the decoder at Whisper's label lengths; layer norms
      at the ends; dropout masks (1 byte) where the config has dropout. The logits, T × vocabulary (51865), three
      copies at the start of the backward pass (log-softmax output and the two gradients of the loss): 1.0 GiB
      in fp32 for 8 x 224 tokens. With gradient checkpointing each layer keeps only its input, plus one layer
      recomputed in full; a frozen encoder keeps only its output.
    - step: at the optimizer step the activations are gone, and what is held instead may be the larger: in fp32
      and fp16 ZeRO-2 flattens the gradient partition into a new fp32 tensor (4Ψt/w, and 2Ψt/w more in fp16), and
      torch's unfused AdamW (on the CPU, where it is not fused) makes two temporaries of the partition (8Ψt/w).
    - baseline (CPU ranks only): interpreter, torch, transformers, DeepSpeed, the tokenizer and gloo, before any of
      the model's tensors: 0.45 GiB of RSS, measured on Linux x86-64 (Python 3.11, torch 2.13 CPU build,
      transformers 5.24, DeepSpeed 0.19.8). Not counted on a GPU (nor the CUDA context, which
      max_memory_allocated leaves out).

    total = baseline + weights + optimizer + max(gradients + activations, step). Batches are padded to their
    longest label, so `label_tokens` is the longest batch a run meets: 224 (half the decoder's 448 positions) by
    default, above Common Voice's sentences.

    Measured (bench/memory.py, bench/results/memory.json: batch 8, fp32, ZeRO-2, one CPU rank, 32-token labels):
    the live bytes (malloc in use) peak within ~2% of this sum for whisper-base (4.62 GiB measured, full
    fine-tuning); the rank's peak RSS is higher by what glibc keeps of the freed activations (its heap is not given
    back, 1.4 GiB there), which is not modelled: against peak RSS the estimate is 16-21% low (whisper-base 5.06 GiB
    for 6.13 measured, encoder frozen 2.20 for 2.78, the tiny model 0.60 for 0.71). Not measured: anything on a GPU
    (bf16, fp16, ZeRO-3 and offload follow from DeepSpeed's code, not from a run).
    """
    from transformers import WhisperConfig

    config = WhisperConfig.from_dict(config_dict)
    n_params, encoder_params = _parameter_counts(config)
    m, d, w = recipe.model, recipe.deepspeed, world_size
    n_trainable = n_params - (encoder_params if m.freeze_encoder else 0)
    zero = deepspeed_config(recipe, w, on_gpu=on_gpu, d_model=config.d_model)["zero_optimization"]
    zero3, bucket = d.zero_stage == 3, zero["reduce_bucket_size"]
    half = d.precision in ("bf16", "fp16")
    wb = 2 if half else 4  # bytes per weight and per activation
    part = n_trainable / w  # this rank's share of the trainable parameters (ZeRO-2 and -3 partition them)

    gathered = min(n_params * (1 - 1 / w), zero.get("stage3_prefetch_bucket_size", 0)) if zero3 else 0
    weights = wb * ((0 if d.offload_params else n_params / (w if zero3 else 1)) + gathered)
    optimizer = 0.0 if d.offload_optimizer else 12 * part
    grad_partition = (2 if d.precision == "fp16" else 4) * part
    bucket_elements = (1 if zero3 else 2) * bucket
    buckets = wb * (bucket_elements if on_gpu else min(n_trainable, bucket_elements))
    gradients = (0.0 if d.offload_optimizer else grad_partition) + buckets
    flat_copy = 0 if zero3 or d.precision == "bf16" else (4 + (2 if d.precision == "fp16" else 0)) * part
    adam_temps = 8 * part if not on_gpu and not d.offload_optimizer else 0
    held = 0.0 if d.offload_optimizer else grad_partition  # still held while the flat copy is made
    step = max(held + flat_copy, flat_copy + adam_temps)
    offloaded = (16 * part if d.offload_optimizer else 0) + (wb * n_params / w if d.offload_params else 0)

    S, T, h, V = config.max_source_positions, label_tokens, config.d_model, config.vocab_size
    fe, fd = config.encoder_ffn_dim / h, config.decoder_ffn_dim / h
    mask_enc = (2 * S * h if config.dropout else 0) + (S * h * fe if config.activation_dropout else 0)
    mask_dec = (3 * T * h if config.dropout else 0) + (T * h * fd if config.activation_dropout else 0)
    enc_layer = wb * (9 + 2 * fe) * S * h + mask_enc  # bytes per sample
    dec_layer = wb * ((14 + 2 * fd) * T * h + 2 * S * h) + mask_dec
    stem = wb * (5 * S * h + 2 * S * config.num_mel_bins)
    if m.freeze_encoder:
        encoder = wb * S * h  # no backward through it: only its output, which every cross-attention reads
    elif m.gradient_checkpointing:
        encoder = stem + wb * (config.encoder_layers + 2) * S * h + enc_layer
    else:
        encoder = stem + config.encoder_layers * enc_layer + wb * 2 * S * h
    if m.gradient_checkpointing:
        decoder = wb * (config.decoder_layers + 2) * T * h + dec_layer
    else:
        decoder = config.decoder_layers * dec_layer + wb * 2 * T * h
    logits = recipe.data.batch_size_per_gpu * wb * 3 * T * V
    activations = recipe.data.batch_size_per_gpu * (encoder + decoder) + logits
    baseline = 0.0 if on_gpu else CPU_RANK_BASELINE_GIB * 2**30
    total = baseline + weights + optimizer + max(gradients + activations, step)
    gib = 2**30
    return {"parameters_millions": n_params / 1e6, "weights_gib": weights / gib, "gradients_gib": gradients / gib,
            "optimizer_gib": optimizer / gib, "activations_gib": activations / gib, "logits_gib": logits / gib,
            "step_gib": step / gib, "baseline_gib": baseline / gib, "offloaded_gib": offloaded / gib,
            "total_gib": total / gib}
