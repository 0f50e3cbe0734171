"""Analytic FLOP count of one Whisper training sample, shared by the benchmarks (MFU = achieved / peak).

Counted: every matrix multiply, at 2 FLOPs per multiply-add (the convention of Kaplan et al. 2020 and of MFU as
PaLM defines it, Chowdhury et al. 2022). Per sample, forward:

- conv front end: conv1 (n_mels -> d, kernel 3) over 3000 frames, 2 * 3 * n_mels * d * 3000;
  conv2 (d -> d, kernel 3, stride 2) producing 1500 frames, 2 * 3 * d^2 * 1500;
- encoder, per layer, on 1500 positions: q, k, v, out projections (4 d^2) and the MLP (2 d ffn):
  2 * (4 d^2 + 2 d ffn) * 1500; attention scores Q K^T and the weighted sum of values: 4 * 1500^2 * d;
- decoder, per layer, on L = label tokens positions (the model prepends the start token and shifts the labels,
  so the decoder sees exactly L positions): self-attention q, k, v, out (4 d^2), cross-attention q and out
  (2 d^2), MLP (2 d ffn): 2 * (6 d^2 + 2 d ffn) * L; the cross-attention k and v projections run over the
  1500 encoder outputs, not over L: 2 * 2 d^2 * 1500 (in large-v3 that is ~11 % of all FLOPs, so it is
  counted where it happens); self-attention scores and values 4 * L^2 * d (full square, the causal mask's
  skipped half included, as MFU conventionally counts); cross-attention 4 * L * 1500 * d;
- output projection to the vocabulary: 2 * d * vocab * L.

Not counted (each well under 1 %): biases, layer norms, softmax, GELU, embeddings (lookups, not matmuls), the
loss. Training = 3 x forward (the backward pass computes gradients for both the inputs and the weights of every
matmul, 2 x forward). With a frozen encoder its backward is skipped: encoder forward once, decoder 3 x.
Gradient checkpointing recomputes the forward (4 x in hardware), but MFU counts model FLOPs only, so it
stays at 3 x: recomputation lowers MFU, as it should.
"""

from __future__ import annotations

H100_DENSE_16BIT_TFLOPS = 989.0
AUDIO_FRAMES = 3000  # log-mel frames in Whisper's 30 s window
ENCODER_POSITIONS = 1500  # after the stride-2 convolution


def forward_flops(*, n_mels: int, d_model: int, encoder_layers: int, decoder_layers: int, encoder_ffn: int,
                  decoder_ffn: int, vocab: int, label_len: int) -> dict[str, float]:
    """Forward FLOPs of one sample, by part (see the module docstring); `total` is their sum."""
    d, s, L = d_model, ENCODER_POSITIONS, label_len
    parts = {
        "conv": 2.0 * 3 * n_mels * d * AUDIO_FRAMES + 2.0 * 3 * d * d * s,
        "encoder_matmul": encoder_layers * 2.0 * (4 * d * d + 2 * d * encoder_ffn) * s,
        "encoder_attention": encoder_layers * 4.0 * s * s * d,
        "decoder_matmul": decoder_layers * (2.0 * (6 * d * d + 2 * d * decoder_ffn) * L + 2.0 * 2 * d * d * s),
        "decoder_attention": decoder_layers * (4.0 * L * L * d + 4.0 * L * s * d),
        "output_projection": 2.0 * d * vocab * L,
    }
    parts["encoder"] = parts["conv"] + parts["encoder_matmul"] + parts["encoder_attention"]
    parts["decoder"] = parts["decoder_matmul"] + parts["decoder_attention"] + parts["output_projection"]
    parts["total"] = parts["encoder"] + parts["decoder"]
    return parts


def training_flops(forward: dict[str, float], freeze_encoder: bool = False) -> float:
    """FLOPs of one training sample (forward + backward): 3 x forward, or the encoder's forward only when frozen."""
    return (1.0 if freeze_encoder else 3.0) * forward["encoder"] + 3.0 * forward["decoder"]


def from_config(config, label_len: int) -> dict[str, float]:
    """forward_flops for a transformers WhisperConfig."""
    return forward_flops(n_mels=config.num_mel_bins, d_model=config.d_model, encoder_layers=config.encoder_layers,
                         decoder_layers=config.decoder_layers, encoder_ffn=config.encoder_ffn_dim,
                         decoder_ffn=config.decoder_ffn_dim, vocab=config.vocab_size, label_len=label_len)


def matmul_parameters(*, d_model: int, encoder_layers: int, decoder_layers: int, encoder_ffn: int, decoder_ffn: int,
                      vocab: int, n_mels: int) -> int:
    """Weights that take part in a matmul (a check: with embeddings it is close to the parameter count)."""
    d = d_model
    return (3 * n_mels * d + 3 * d * d + encoder_layers * (4 * d * d + 2 * d * encoder_ffn)
            + decoder_layers * (8 * d * d + 2 * d * decoder_ffn) + vocab * d)
