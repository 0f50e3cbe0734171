"""Whisper's log-mel front end, computed only over the frames the audio reaches.

Whisper pads every clip with zeros to 30 s, takes a 400-point STFT every 160 samples (10 ms),
maps power to 80 (or 128) Slaney mel bands, takes log10, clamps everything to at most 8 below the
window's maximum and rescales with (x + 4) / 4. Frames that see only padding have zero power, hence the
lowest possible value, so they never set the maximum: the frames that the audio reaches carry all the
information, and the padded tail is one constant that follows from their maximum (`pad_value`).

Shards therefore store `log_mel_spectrogram(audio)` (unpadded, float16) and training pads with
`pad_features`, which equals `transformers.WhisperFeatureExtractor` on the same 16 kHz audio.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in Whisper's 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in that window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
LOG_FLOOR = -10.0  # log10 of the 1e-10 power clamp: the value of a frame that sees only zeros
DYNAMIC_RANGE = 8.0  # log10 units kept below the window's maximum
SUPPORTED_N_MELS = (80, 128)  # 80 for v1/v2 and distil models, 128 for large-v3


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (as librosa with htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular filters, shape [n_mels, 1 + N_FFT // 2], from 0 Hz to Nyquist."""
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels}")
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    lower, center, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lower) / (center - lower)
    falling = (upper - fft_hz[None, :]) / (upper - center)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    area_norm = 2.0 / (upper - lower)  # Slaney: each filter has (about) constant energy
    return (triangles * area_norm).astype(np.float32)


def n_frames(n_samples: int) -> int:
    """Frames of the 30 s window whose STFT window overlaps the first `n_samples` samples.

    With centred 400-sample windows every 160 samples, frame t spans samples [160 t - 200, 160 t + 200).
    """
    return min(N_FRAMES, (n_samples + N_FFT // 2 - 1) // HOP_LENGTH + 1)


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Unpadded Whisper log-mel of 16 kHz mono audio: float32 [n_mels, n_frames(len(audio))].

    The STFT runs over the audio followed by enough zeros that every kept frame sees exactly what it sees
    in Whisper's zero-padded 30 s window (including the reflection at the start), and no further.
    """
    n = len(audio)
    if n == 0 or n > N_SAMPLES:
        raise ValueError(f"audio must hold 1..{N_SAMPLES} samples at {SAMPLE_RATE} Hz, got {n}")
    frames = n_frames(n)
    # Zeros beyond the last kept frame's reach, so the right-hand reflect padding reflects only zeros.
    length = min(N_SAMPLES, frames * HOP_LENGTH + N_FFT)
    waveform = torch.zeros(length, dtype=torch.float32)
    waveform[:n] = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    stft = torch.stft(waveform, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    stft = stft[:, :frames]
    power = stft.real.square() + stft.imag.square()  # |X|^2 without the sqrt of abs(): same value, half the time
    mel = torch.from_numpy(mel_filters(n_mels)) @ power
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).numpy()


def pad_value(stored_max: float) -> float:
    """The value of every padded frame, given the maximum of the stored (normalised) frames.

    Padding frames hold LOG_FLOOR before the clamp to (window max - DYNAMIC_RANGE); after (x + 4) / 4
    that is max((LOG_FLOOR + 4) / 4, stored_max - DYNAMIC_RANGE / 4).
    """
    return max((LOG_FLOOR + 4.0) / 4.0, stored_max - DYNAMIC_RANGE / 4.0)


def join_features(mels: list[np.ndarray], offsets: list[int], frames: int | None = None) -> np.ndarray:
    """Unpadded log-mels placed at frame `offsets` of one window -> that window's unpadded log-mel, float32
    [n_mels, frames] (default: up to the last clip's end): what `log_mel_spectrogram` gives for the clips' audio
    placed at samples 160 * offset with silence between them.

    Exact but for the frames whose 25 ms STFT window spans a join (see bench/packing.py's measurement): each
    stored clip saw Whisper's reflection of its own first samples and zeros after its end. Between clips lies
    silence (the floor, LOG_FLOOR); then everything is clamped to 8 below the window's maximum, which is a no-op
    for the clip holding it and lifts the others' floors from their own maximum - 8 to the window's: each clip's
    stored values are max(x, own_max - 8) and max(that, window_max - 8) = max(x, window_max - 8)."""
    if len(mels) != len(offsets) or not mels:
        raise ValueError(f"need one offset per clip, got {len(mels)} clips and {len(offsets)} offsets")
    end = max(o + m.shape[-1] for m, o in zip(mels, offsets, strict=True))
    frames = end if frames is None else frames
    if end > frames:
        raise ValueError(f"clips reach frame {end}, past the window's {frames}")
    out = np.full((mels[0].shape[0], frames), (LOG_FLOOR + 4.0) / 4.0, dtype=np.float32)
    for mel, offset in zip(mels, offsets, strict=True):
        out[:, offset: offset + mel.shape[-1]] = mel
    return np.maximum(out, out.max() - DYNAMIC_RANGE / 4.0)


def stack_features(mels: list, window: int = N_FRAMES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpadded log-mels -> ([batch, n_mels, longest] in their dtype (float16 from shards), frames per clip,
    float32 pad value per clip).

    What a batch carries from the loader to the device: the stored float16 frames only (a 5 s clip is a sixth of
    its padded window, and half the bytes of float32); `pad_batch` makes the model's window (`window` frames) there."""
    mels = [torch.as_tensor(m) for m in mels]
    longest = max(m.shape[-1] for m in mels)
    if longest > window:
        raise ValueError(f"features have {longest} frames, more than the model's input window of {window}")
    out = torch.zeros((len(mels), mels[0].shape[0], longest), dtype=mels[0].dtype)
    for i, m in enumerate(mels):
        out[i, :, : m.shape[-1]] = m
    frames = torch.tensor([m.shape[-1] for m in mels], dtype=torch.int64)
    pads = torch.tensor([pad_value(float(m.float().max())) for m in mels], dtype=torch.float32)
    return out, frames, pads


def pad_batch(features: torch.Tensor, frames: torch.Tensor, pads: torch.Tensor, dtype: torch.dtype = torch.float32,
              window: int = N_FRAMES) -> torch.Tensor:
    """`stack_features`' output -> [batch, n_mels, window] in `dtype`, on the tensors' device: each clip's frames,
    then its pad value, exactly as Whisper's zero-padded 30 s window gives (the feature extractor's output)."""
    batch, n_mels, longest = features.shape
    out = pads.to(dtype)[:, None, None].expand(batch, n_mels, window).clone()
    stored = torch.arange(longest, device=features.device)[None, None, :] < frames.to(features.device)[:, None, None]
    out[:, :, :longest] = torch.where(stored, features.to(dtype), out[:, :, :longest])
    return out


def pad_features(mel: torch.Tensor | np.ndarray, frames: int = N_FRAMES) -> torch.Tensor:
    """Pad one unpadded log-mel [n_mels, t] to [n_mels, frames] float32, as Whisper's 30 s window gives."""
    return pad_batch(*stack_features([mel]), window=frames)[0]
