"""One decode path: any container, rate and channel count -> 16 kHz mono float32."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from launcher.audio import AudioError, decode_audio
from tests.conftest import DEMO, demo_rows, tone


def encode(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_hz(x: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("rate, channels, fmt, subtype", [
    (8000, 1, "WAV", None), (22050, 2, "FLAC", None), (44100, 1, "OGG", "VORBIS"), (48000, 2, "OGG", "OPUS"),
    (48000, 1, "MP3", None), (16000, 1, "WAV", "PCM_16"),
])
def test_any_rate_channels_and_container_become_16k_mono(rate, channels, fmt, subtype):
    pcm = decode_audio(encode(tone(2.0, rate, freq=440.0, channels=channels), rate, fmt, subtype))
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(len(pcm) - 32000) <= 0.03 * 32000  # lossy codecs add a little priming/padding
    assert dominant_hz(pcm) == pytest.approx(440.0, abs=2.0)


def test_channels_are_averaged():
    left = tone(1.0, 16000)
    pcm = decode_audio(encode(np.stack([left, -left], axis=1), 16000, "WAV", "FLOAT"))
    assert np.abs(pcm).max() < 1e-6


def test_real_common_voice_style_mp3_decodes_to_speech():
    pcm = decode_audio((DEMO / "clips" / demo_rows()[0]["path"]).read_bytes())
    assert 0.5 < len(pcm) / 16000 < 10 and 0.01 < np.abs(pcm).max() <= 1.0


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_audio"), (b"RIFF\x00\x00garbage" * 10, "unreadable_audio"),
    (encode(np.zeros((0, 1), np.float32), 16000, "WAV"), "empty_audio"),
])
def test_bad_bytes_raise_with_a_drop_reason(data, reason):
    with pytest.raises(AudioError) as e:
        decode_audio(data)
    assert e.value.reason == reason
