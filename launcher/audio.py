"""Decode any clip (MP3, WAV, FLAC, Ogg/Opus, ... at any rate and channel count) to 16 kHz mono float32.

One decode path for every source: libsndfile (through soundfile) reads the bytes, channels are averaged,
and soxr's high-quality resampler brings the rate to 16 kHz, as librosa (and so `datasets.Audio`) does.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile
import soxr

from launcher.features import SAMPLE_RATE


class AudioError(Exception):
    """A clip that cannot become training audio; `reason` is a stable drop reason for dropped.jsonl."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_audio(data: bytes, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Encoded audio bytes -> mono float32 at `sampling_rate`. Raises AudioError with a drop reason."""
    if not data:
        raise AudioError("empty_audio", "the file is empty (0 bytes)")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise AudioError("unreadable_audio", f"libsndfile: {e.error_string}") from None
    except (RuntimeError, ValueError, EOFError) as e:
        raise AudioError("unreadable_audio", f"{type(e).__name__}: {e}") from None
    if samples.shape[0] == 0:
        raise AudioError("empty_audio", "the file decodes to 0 samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("unreadable_audio", "the decoded audio holds NaN or infinite samples")
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
