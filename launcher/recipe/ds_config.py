"""The DeepSpeed config built from a recipe, every number concrete (no "auto")."""

from __future__ import annotations

from typing import Any

from launcher.recipe.schema import Recipe


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
