"""The recipe's schema: pydantic sections with extra keys forbidden everywhere, and the cross-field checks that
need nothing but the recipe. Errors are collected by `launcher.recipe.load` and reported all at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    max_seconds: Annotated[float, Field(gt=0.0, le=30.0)] | None = Field(
        None, description="a window's length at most; default: the model's input window (30 s for Whisper)")
    same_speaker: bool = Field(False, description="join only clips of one speaker (the shards' speaker ids)")
    gap_seconds: Annotated[float, Field(ge=0.0, le=5.0)] = Field(0.2, description="silence between two clips")
    single_probability: Probability = Field(
        0.0, description="share of windows that hold a single clip followed by silence, as short-form evaluation "
                         "presents every clip (the fear that a packed model keeps talking after a short clip ends "
                         "was not borne out by bench/packing.py: 0 by default)")


class ShardSet(Section):
    path: str = Field(description="folder or URL (s3://, gs://, az://, hf://datasets/..., https://) holding "
                                  "index.json, from `launcher shard`")
    weight: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="this set's share of the mix, relative to the other sets' weights (all or none)")
    language: str | None = Field(None, description="default: index.json's language")


class DataSection(Section):
    shards: str | list[ShardSet] = Field(
        description="folder or URL holding index.json (from `launcher shard`), or a list of {path, weight, "
                    "language}: one set per language, mixed in each epoch by weight (launcher/data/mixing.py)")
    remote_cache: str | None = Field(
        None, description="a local folder that keeps the shards of sets read from URLs for later epochs (and the "
                          "node's other ranks), the least recently used evicted past remote_cache_gb; unset: each "
                          "shard is fetched, read and deleted")
    remote_cache_gb: Annotated[float, Field(gt=0.0)] = 100.0
    prefetch_shards: NonNegInt = Field(2, description="remote shards fetched ahead of the one being read, per loader "
                                                      "worker")
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
        return [ShardSet(path=self.shards)] if isinstance(self.shards, str) else list(self.shards)


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
