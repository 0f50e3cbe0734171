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
    language: str = Field(description="language code of the transcripts, e.g. fr")
    task: Literal["transcribe", "translate"] = "transcribe"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    freeze_encoder: bool = False
    spec_augment: SpecAugment = SpecAugment()


class DataSection(Section):
    shards: Path = Field(description="folder holding index.json, from `launcher shard`")
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
    batch_size_per_gpu: PositiveInt | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=444)] = 225
    num_beams: PositiveInt = 1
    test_at_end: bool = Field(True, description="score the delivered model on the test split and write its card")


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


def check_against_data_and_model(recipe: Recipe) -> tuple[dict, dict]:
    """Cross-checks that need index.json and the model's config; returns both. All problems at once."""
    from launcher.index import load_index

    problems, index, config = [], None, None
    try:
        index = load_index(recipe.data.shards)
    except LauncherError as e:
        problems.append(f"data.shards: {e}")
    try:
        config = load_model_config(recipe.model.name_or_path)
    except LauncherError as e:
        problems.append(str(e))
    if index is not None:
        for field, split in [("data.train_split", recipe.data.train_split),
                             *((f"eval.splits[{i}]", s) for i, s in enumerate(recipe.eval.splits))]:
            if split not in index["splits"]:
                problems.append(f"{field}: got {split!r}, expected one of the shards' splits "
                                f"({', '.join(index['splits'])})")
        if recipe.eval.every_steps and "test" in recipe.eval.splits:
            problems.append("eval.splits: periodic evaluation must not use the test split (it picks the best "
                            "checkpoint); test is scored once at the end")
    if index is not None and config is not None:
        n_mels = index["features"].get("n_mels")
        if n_mels != config.get("num_mel_bins"):
            problems.append(f"data.shards: features have n_mels={n_mels}, but model {recipe.model.name_or_path!r} "
                            f"expects num_mel_bins={config.get('num_mel_bins')}; reshard with --n-mels "
                            f"{config.get('num_mel_bins')}")
    if problems:
        raise LauncherError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return index, config


# ---- DeepSpeed --------------------------------------------------------------------------------------------------

def deepspeed_config(recipe: Recipe, world_size: int, on_gpu: bool = True) -> dict:
    """The DeepSpeed config, every number concrete (no "auto"): optimizer, schedule, ZeRO, precision.
    Off the GPU, DeepSpeed's fused Adam would need a C++ build: torch's AdamW is used instead."""
    o, d = recipe.optim, recipe.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if d.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                     "stage3_gather_16bit_weights_on_model_save": True})
        zero.pop("allgather_bucket_size")
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    warmup = o.warmup_steps
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
                                                   "weight_decay": o.weight_decay,
                                                   **({} if on_gpu else {"torch_adam": True})}},
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1_000_000_000,  # the launcher logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
        "seed": recipe.seed,
    }


# ---- the memory estimate ---------------------------------------------------------------------------------------

def memory_estimate(recipe: Recipe, config_dict: dict, world_size: int) -> dict[str, float]:
    """GiB per GPU, an estimate to choose ZeRO stage, offload and checkpointing before queueing a job.

    Model states (Ψ parameters, mixed precision, Adam): 16-bit weights 2Ψ (÷ world under ZeRO-3), 16-bit
    gradients 2Ψ ÷ world (ZeRO-2/3 partition them), fp32 master weights + Adam moments 12Ψ ÷ world (0 on the
    GPU when offloaded). fp32 training keeps 4Ψ weights and 4Ψ gradients instead. Activations per sample and
    layer, 16-bit, with SDPA (no attention matrix kept): about 34·s·h bytes (Korthikanti et al. 2022, without
    the 5·a·s² term), s = 1500 positions in the encoder and 224 label tokens in the decoder; with gradient
    checkpointing only each layer's input, 2·s·h, plus one layer's full set; a frozen encoder keeps none.
    10% on top for buffers.
    """
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig.from_dict(config_dict)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in WhisperForConditionalGeneration(config).parameters())
    n_trainable = n_params
    if recipe.model.freeze_encoder:
        with torch.device("meta"):
            n_trainable -= sum(p.numel() for p in WhisperForConditionalGeneration(config).model.encoder.parameters())
    d, w = recipe.deepspeed, world_size
    half = d.precision in ("bf16", "fp16")
    weight_bytes = 2 if half else 4
    weights = weight_bytes * n_params / (w if d.zero_stage == 3 else 1)
    if d.offload_params:
        weights = 0.0
    grads = weight_bytes * n_trainable / w
    optim = 0.0 if d.offload_optimizer else (12 if half else 8) * n_trainable / w
    h, b, ckpt = config.d_model, recipe.data.batch_size_per_gpu, recipe.model.gradient_checkpointing

    def stack(positions: int, n_layers: int) -> float:  # bytes per sample, 16-bit activations
        return 2 * positions * h * n_layers + 34 * positions * h if ckpt else 34 * positions * h * n_layers

    encoder = 0.0 if recipe.model.freeze_encoder else stack(1500, config.encoder_layers)  # frozen: no backward
    acts = (encoder + stack(448 // 2, config.decoder_layers)) * b * (1 if half else 2)
    gib = 1024 ** 3
    total = (weights + grads + optim + acts) * 1.1
    return {"parameters_millions": n_params / 1e6, "weights_gib": weights / gib, "gradients_gib": grads / gib,
            "optimizer_gib": optim / gib, "activations_gib": acts / gib, "total_gib": total / gib}
