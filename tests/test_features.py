"""Stored features padded back to 30 s equal transformers' WhisperFeatureExtractor on the same audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from launcher import audio, features
from tests.conftest import DEMO, demo_rows


def speech(seconds: float) -> np.ndarray:
    """Real speech (bundled espeak-ng clips, decoded from MP3 at 48 kHz), concatenated to length."""
    pcm = np.concatenate([audio.decode_audio((DEMO / "clips" / r["path"]).read_bytes()) for r in demo_rows()[:12]])
    reps = int(np.ceil(seconds * features.SAMPLE_RATE / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * features.SAMPLE_RATE)]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ref = WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T
    np.testing.assert_allclose(features.mel_filters(n_mels), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.2, 3.7, 12.345, 29.97, 30.0])
def test_stored_float16_features_padded_equal_whisper_feature_extractor(n_mels, seconds):
    pcm = speech(seconds)
    ref = WhisperFeatureExtractor(feature_size=n_mels)(pcm, sampling_rate=16000, return_tensors="np")
    ref = ref.input_features[0]
    stored = features.log_mel_spectrogram(pcm, n_mels).astype(np.float16)  # what a shard holds
    assert stored.shape == (n_mels, features.n_frames(len(pcm)))
    padded = features.pad_features(torch.from_numpy(stored)).numpy()
    assert padded.shape == ref.shape == (n_mels, 3000)
    # float16 keeps 11 significant bits: values of magnitude < 2 round by at most 2**-10
    np.testing.assert_allclose(padded, ref, rtol=0, atol=2**-10)


def test_frames_beyond_the_audio_hold_exactly_the_pad_value():
    pcm = speech(4.0)
    ref = WhisperFeatureExtractor()(pcm, sampling_rate=16000, return_tensors="np").input_features[0]
    t = features.n_frames(len(pcm))
    assert np.all(ref[:, t:] == ref[:, t:t + 1]) and np.any(ref[:, t - 1] != ref[:, t])
    assert features.pad_value(float(ref[:, :t].max())) == pytest.approx(float(ref[0, t]), abs=1e-6)


def test_silence_pads_with_the_floor_value():
    padded = features.pad_features(features.log_mel_spectrogram(np.zeros(8000, np.float32)))
    assert torch.all(padded == -1.5)


@pytest.mark.parametrize("n", [0, features.N_SAMPLES + 1])
def test_audio_outside_the_window_is_refused(n):
    with pytest.raises(ValueError, match="1..480000 samples"):
        features.log_mel_spectrogram(np.zeros(n, np.float32))
