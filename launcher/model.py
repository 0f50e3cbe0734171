"""The model: loading and configuring it for training, the decoding settings, and plain copies of it.

A plain copy (`materialize`) is how weights leave the engine. Under ZeRO-3 each rank holds a slice of every
weight, and DeepSpeed's per-module hooks gather the rest at every forward, i.e. several collectives per decoded
token: ranks that decode different numbers of tokens then issue different collectives, and the job aborts (gloo)
or hangs (NCCL). `deepspeed.zero.GatheredParameters` does not stop those hooks. So evaluation and export gather
each weight once, in the same order on every rank, into a model of their own that has no hooks, and decode or save
that: what one rank decodes can then never wait on another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from launcher.recipe.schema import ModelSection, Recipe

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GATHER_ELEMENTS = 64 * 2**20  # weights gathered per collective while copying: bounds the extra memory


def input_frames(config) -> int:
    """Feature frames of the model's input window (a WhisperConfig or its config.json dict): two per encoder position
    (the encoder's second convolution has stride 2), 3000 (30 s) for every Whisper; the suite's tiny models take
    fewer, which is what makes them fast."""
    positions = config["max_source_positions"] if isinstance(config, dict) else config.max_source_positions
    return 2 * positions


def configure_for_training(model, m: ModelSection):
    """What the recipe's `model` section changes on a loaded (or randomly initialised) Whisper."""
    model.config.use_cache = False  # the cache only serves generation; in training it costs memory
    sa = m.spec_augment
    model.config.apply_spec_augment = sa.enabled
    model.config.mask_time_prob, model.config.mask_time_length = sa.mask_time_prob, sa.mask_time_length
    model.config.mask_feature_prob, model.config.mask_feature_length = sa.mask_feature_prob, sa.mask_feature_length
    model.generation_config.forced_decoder_ids = None
    if m.freeze_encoder:
        model.model.encoder.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_model(recipe: Recipe):
    """The model and processor from `model.name_or_path` (hub id or folder), configured for training."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    m = recipe.model
    processor = WhisperProcessor.from_pretrained(m.name_or_path)
    model = WhisperForConditionalGeneration.from_pretrained(m.name_or_path, attn_implementation=m.attn_implementation,
                                                            dtype=torch.float32)
    return configure_for_training(model, m), processor


@dataclass(frozen=True)
class DecodeSettings:
    """How evaluation decodes: the event's rule is greedy (num_beams 1) with the language token forced (None: not
    forced, Whisper detects it: what a model exported from several languages does)."""

    language: str | None
    task: str = "transcribe"
    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 225

    def generation_config(self, model):
        """The model's generation config with these settings: passed whole to `generate` (no loose keyword
        arguments beside it) and exported with the model, so a pipeline decodes as the reported WER was measured."""
        config = copy.deepcopy(model.generation_config)
        # Whisper's generate counts `max_length` after its prompt tokens (<|sot|><|lang|><|task|><|notimestamps|>),
        # so it is the number of new tokens; `max_new_tokens` beside a model's max_length only adds a warning
        settings = {"language": self.language, "task": self.task, "return_timestamps": False,
                    "num_beams": self.num_beams, "do_sample": False, "max_length": self.max_new_tokens,
                    "max_new_tokens": None, "forced_decoder_ids": None,
                    # one generate pass per clip, as openai's decode: otherwise transformers' seek loop re-decodes a
                    # clip whose output holds a timestamp token (a model trained on timestamped labels may emit one)
                    "force_unique_generate_call": True}
        for key, value in settings.items():  # setattr: GenerationConfig.update skips keys it does not define yet
            setattr(config, key, value)
        return config


def _is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter: this rank holds a slice, `ds_shape` is the whole


def _chunks(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    chunk, size = [], 0
    for name, p in params:
        chunk.append((name, p))
        size += p.ds_numel if _is_partitioned(p) else p.numel()
        if size >= GATHER_ELEMENTS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def materialize(model, device, dtype, *, here: bool = True):
    """A plain copy of `model` with its full weights and no DeepSpeed hooks, on `device` in `dtype`.

    Collective when the model is ZeRO-3 partitioned: every rank must call it (weights are gathered chunk by
    chunk, in the same order everywhere). Ranks with `here=False` take part in the gathering but keep nothing
    and get None (export: only rank 0 writes). Config and generation config are copies: nothing about the live
    model changes."""
    import deepspeed

    target = None
    if here:
        with torch.device("meta"):
            target = type(model)(copy.deepcopy(model.config)).to(dtype)
        target.to_empty(device=device)
        target.tie_weights()  # to_empty gives tied weights separate storage; tie them again before copying
        target.generation_config = copy.deepcopy(model.generation_config)
    dest = dict(target.named_parameters()) if target is not None else {}
    for chunk in _chunks(list(model.named_parameters())):
        partitioned = [p for _, p in chunk if _is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            if target is not None:
                for name, p in chunk:
                    dest[name].data.copy_(p.data)
    if target is not None:
        for name, buffer in model.named_buffers():  # never partitioned
            target.get_buffer(name).copy_(buffer)
        target.eval()
        target.requires_grad_(False)
    return target
