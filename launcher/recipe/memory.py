"""How many parameters a Whisper config has, and the memory a recipe needs per rank (`launcher validate`,
`launcher doctor`, the launch advice on an out-of-memory kill)."""

from __future__ import annotations

from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.schema import Recipe

CPU_RANK_BASELINE_GIB = 0.45  # a CPU rank's RSS before any of the model's tensors: see memory_estimate
_PARAMETER_COUNTS: dict[str, tuple[int, int]] = {}


def parameter_counts(config: dict) -> tuple[int, int]:
    """(all, encoder) parameters of a Whisper config.json's dict, counted on the meta device: the model's own
    arithmetic, no memory, no weights read. The one place parameters are counted (validate, doctor, estimate)."""
    import json

    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _PARAMETER_COUNTS:
        import torch
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        with torch.device("meta"):
            model = WhisperForConditionalGeneration(WhisperConfig.from_dict(config))
        _PARAMETER_COUNTS[key] = (sum(p.numel() for p in model.parameters()),
                                  sum(p.numel() for p in model.model.encoder.parameters()))
    return _PARAMETER_COUNTS[key]


def trainable_parameters(config: dict, freeze_encoder: bool) -> tuple[int, int]:
    """(all, trainable) parameters: the encoder's are not trained when it is frozen."""
    total, encoder = parameter_counts(config)
    return total, total - (encoder if freeze_encoder else 0)


def memory_estimate(recipe: Recipe, config_dict: dict, world_size: int, *, on_gpu: bool = True,
                    label_tokens: int | None = None) -> dict[str, float]:
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
    longest label, so `label_tokens` is the longest batch a run meets: by default 224 (half the decoder's 448
    positions), above Common Voice's sentences, and 448 with packing (a window's labels close before 448 tokens).

    Measured (bench/memory.py, bench/results/memory.json: batch 8, fp32, ZeRO-2, one CPU rank, 32-token labels):
    the live bytes (malloc in use) peak within ~2% of this sum for whisper-base (4.62 GiB measured, full
    fine-tuning); the rank's peak RSS is higher by what glibc keeps of the freed activations (its heap is not given
    back, 1.4 GiB there), which is not modelled: against peak RSS the estimate is 16-21% low (whisper-base 5.06 GiB
    for 6.13 measured, encoder frozen 2.20 for 2.78, the tiny model 0.60 for 0.71). Not measured: anything on a GPU
    (bf16, fp16, ZeRO-3 and offload follow from DeepSpeed's code, not from a run).
    """
    from transformers import WhisperConfig

    config = WhisperConfig.from_dict(config_dict)
    n_params, encoder_params = parameter_counts(config_dict)
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

    if label_tokens is None:
        label_tokens = 448 if recipe.data.pack.enabled else 224
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
