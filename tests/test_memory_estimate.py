"""The memory estimate's structure (launcher.recipe.memory_estimate), on whisper-base's dimensions written here: no
download, no training. How close it comes to measured peaks is bench/memory.py's business."""

from __future__ import annotations

import pytest

from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.load import load_recipe
from launcher.recipe.memory import CPU_RANK_BASELINE_GIB, memory_estimate
from tests.conftest import REPO

GIB = 2**30
# openai/whisper-base: 72,593,920 parameters (the output projection is the token embedding), 20,590,592 in the encoder
WHISPER_BASE = {"model_type": "whisper", "d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
                "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
                "decoder_ffn_dim": 2048, "vocab_size": 51865, "num_mel_bins": 80, "max_source_positions": 1500,
                "max_target_positions": 448, "tie_word_embeddings": True}
PARAMS, ENCODER_PARAMS = 72_593_920, 20_590_592


def recipe(*overrides: str):
    return load_recipe(REPO / "recipes" / "tiny_demo.yaml",
                       ["model.name_or_path=unused", "data.shards=unused", "data.batch_size_per_gpu=8",
                        "deepspeed.precision=bf16", *overrides])


def estimate(*overrides: str, world: int = 1, **kwargs) -> dict:
    return memory_estimate(recipe(*overrides), WHISPER_BASE, world, **kwargs)


def bucket(*overrides: str, world: int = 1) -> int:
    return deepspeed_config(recipe(*overrides), world, on_gpu=True, d_model=512)["zero_optimization"][
        "reduce_bucket_size"]


def test_keys_the_callers_read_and_the_total():
    est = estimate()
    for key in ("parameters_millions", "weights_gib", "gradients_gib", "optimizer_gib", "activations_gib",
                "total_gib", "baseline_gib", "logits_gib", "step_gib", "offloaded_gib"):
        assert key in est
    assert est["parameters_millions"] == pytest.approx(PARAMS / 1e6)
    for on_gpu in (True, False):
        e = estimate("deepspeed.precision=fp32", on_gpu=on_gpu)
        assert e["total_gib"] == pytest.approx(e["baseline_gib"] + e["weights_gib"] + e["optimizer_gib"]
                                               + max(e["gradients_gib"] + e["activations_gib"], e["step_gib"]))


def test_zero3_divides_the_weights_by_the_world_size_and_zero2_does_not():
    zero2 = [estimate(world=w)["weights_gib"] for w in (1, 8)]
    assert zero2[0] == zero2[1] == pytest.approx(2 * PARAMS / GIB)  # bf16: 2 bytes each, whole on every rank
    one, eight, sixteen = (estimate("deepspeed.zero_stage=3", world=w)["weights_gib"] for w in (1, 8, 16))
    assert one == pytest.approx(2 * PARAMS / GIB)
    assert one > eight > sixteen
    # its slice, plus the weights it gathers ahead of use (the prefetch bucket: most of whisper-base)
    prefetch = deepspeed_config(recipe("deepspeed.zero_stage=3"), 8, on_gpu=True, d_model=512)[
        "zero_optimization"]["stage3_prefetch_bucket_size"]
    assert eight * GIB == pytest.approx(2 * (PARAMS / 8 + min(PARAMS * 7 / 8, prefetch)))
    assert (eight - sixteen) * GIB == pytest.approx(2 * (PARAMS / 8 - PARAMS / 16))
    # both partition the optimizer state and the gradients
    for stage in (2, 3):
        opt = [estimate(f"deepspeed.zero_stage={stage}", world=w)["optimizer_gib"] for w in (1, 8)]
        assert opt[1] == pytest.approx(opt[0] / 8)


def test_offload_moves_the_optimizer_off_the_gpu():
    kept, offloaded = estimate(world=4), estimate("deepspeed.offload_optimizer=true", world=4)
    assert kept["optimizer_gib"] == pytest.approx(12 * PARAMS / 4 / GIB)  # fp32 master + two Adam moments
    assert offloaded["optimizer_gib"] == 0.0
    assert offloaded["offloaded_gib"] == pytest.approx(16 * PARAMS / 4 / GIB)  # + the fp32 gradient partition
    assert offloaded["total_gib"] < kept["total_gib"]
    params = estimate("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                      world=4)
    assert params["weights_gib"] < estimate("deepspeed.zero_stage=3", world=4)["weights_gib"]


def test_a_frozen_encoder_trains_fewer_parameters_and_keeps_fewer_activations():
    full, frozen = estimate(), estimate("model.freeze_encoder=true")
    trainable = PARAMS - ENCODER_PARAMS
    assert frozen["optimizer_gib"] == pytest.approx(12 * trainable / GIB)
    assert frozen["weights_gib"] == full["weights_gib"]  # the frozen weights are still there
    # the encoder's 1500 positions keep nothing but its output; the decoder and the logits are unchanged
    assert frozen["logits_gib"] == full["logits_gib"]
    assert frozen["activations_gib"] - frozen["logits_gib"] < (full["activations_gib"] - full["logits_gib"]) / 4


def test_gradient_checkpointing_lowers_activations_not_model_states():
    plain, ckpt = estimate(), estimate("model.gradient_checkpointing=true")
    assert ckpt["logits_gib"] == plain["logits_gib"]  # the loss is not checkpointed
    assert ckpt["activations_gib"] - ckpt["logits_gib"] < (plain["activations_gib"] - plain["logits_gib"]) / 3
    for key in ("weights_gib", "gradients_gib", "optimizer_gib"):
        assert ckpt[key] == plain[key]


def test_gradients_accumulate_in_fp32_under_bf16_and_in_fp16_under_fp16():
    world = 4
    for precision, partition_bytes in (("bf16", 4), ("fp16", 2), ("fp32", 4)):
        est = estimate(f"deepspeed.precision={precision}", world=world)
        weight_bytes = 4 if precision == "fp32" else 2
        buckets = 2 * bucket(world=world) * weight_bytes  # ZeRO-2's two reduce buckets, in the weights' dtype
        assert est["gradients_gib"] * GIB == pytest.approx(partition_bytes * PARAMS / world + buckets)
    zero3 = estimate("deepspeed.zero_stage=3", world=world)
    assert zero3["gradients_gib"] * GIB == pytest.approx(4 * PARAMS / world
                                                         + bucket("deepspeed.zero_stage=3", world=world) * 2)


def test_fp32_holds_its_weights_twice_and_16_bit_activations_are_half():
    fp32, bf16 = estimate("deepspeed.precision=fp32"), estimate()
    assert fp32["weights_gib"] == pytest.approx(4 * PARAMS / GIB)
    assert fp32["optimizer_gib"] == pytest.approx(12 * PARAMS / GIB)  # DeepSpeed's fp32 master is a clone
    assert bf16["activations_gib"] == pytest.approx(fp32["activations_gib"] / 2)


def test_logits_are_three_copies_of_batch_x_labels_x_vocabulary():
    for tokens in (32, 224, 448):
        est = estimate("deepspeed.precision=fp32", label_tokens=tokens)
        assert est["logits_gib"] * GIB == pytest.approx(3 * 8 * tokens * 51865 * 4)
    short, long = estimate(label_tokens=32), estimate(label_tokens=448)
    assert long["activations_gib"] > short["activations_gib"]
    assert estimate()["logits_gib"] == estimate(label_tokens=224)["logits_gib"]  # the default
    assert estimate("data.pack.enabled=true") == estimate(label_tokens=448)  # packed windows' labels reach 448


def test_activations_scale_with_the_batch():
    eight, sixteen = estimate(), estimate("data.batch_size_per_gpu=16")
    assert sixteen["activations_gib"] == pytest.approx(2 * eight["activations_gib"])


def test_a_cpu_rank_counts_its_baseline_unfused_adam_and_only_written_buckets():
    gpu, cpu = (estimate("deepspeed.precision=fp32", on_gpu=g) for g in (True, False))
    assert gpu["baseline_gib"] == 0.0 and cpu["baseline_gib"] == CPU_RANK_BASELINE_GIB
    # a bucket's untouched pages are not resident on the CPU: at most every trainable gradient once
    assert cpu["gradients_gib"] * GIB == pytest.approx(4 * PARAMS + 4 * min(PARAMS, 2 * bucket()))
    assert gpu["gradients_gib"] * GIB == pytest.approx(4 * PARAMS + 4 * 2 * bucket())
    # the optimizer step: fp32 ZeRO-2 flattens the gradients (4 bytes each) and torch's unfused AdamW on the CPU
    # makes two temporaries of the partition (8 bytes each)
    assert cpu["step_gib"] * GIB == pytest.approx(12 * PARAMS)
    assert gpu["step_gib"] * GIB == pytest.approx(8 * PARAMS)  # the partition, and its flat copy
    assert estimate(on_gpu=True)["step_gib"] * GIB == pytest.approx(4 * PARAMS)  # bf16: no copy, fused Adam
