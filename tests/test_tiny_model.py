"""The tiny offline Whisper loads, tokenizes, generates and transcribes with the real transformers classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
    pipeline,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from launcher.tiny_model import build_tiny_whisper, build_tokenizer, demo_sentences, special_tokens

FILES = ["config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
         "tokenizer_config.json"]



@pytest.fixture(scope="module")
def tiny_model(tiny_model_30s: Path) -> Path:
    """Here the tiny model at its default, Whisper's real dimensions (the suite's runs use a 6 s window)."""
    return tiny_model_30s

def noise_features(folder: Path, seconds: float = 1.0) -> torch.Tensor:
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))).astype(np.float32)
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    return extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def prompt(tokenizer: WhisperTokenizerFast) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|fr|>", "<|transcribe|>", "<|notimestamps|>"])


def test_folder_loads_with_every_transformers_loader(tiny_model: Path):
    assert sorted(p.name for p in tiny_model.iterdir()) == FILES
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    processor = WhisperProcessor.from_pretrained(tiny_model)
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    asr = pipeline("automatic-speech-recognition", model=str(tiny_model))

    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (64, 2, 2)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (4, 4)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim, config.num_mel_bins) == (256, 256, 80)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert config.vocab_size == len(tokenizer) == len(processor.tokenizer) == model.get_output_embeddings().out_features
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id, config.decoder_start_token_id) == (
        eot, eot, eot, sot)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eot
    assert processor.feature_extractor.feature_size == 80
    assert asr.model.config.vocab_size == config.vocab_size


def test_special_tokens_follow_the_bpe_vocabulary_in_whispers_order(tiny_model: Path):
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    ids = tokenizer.convert_tokens_to_ids(special_tokens())
    assert ids == list(range(400, 400 + len(ids)))  # right after the 400 BPE tokens
    assert special_tokens()[2:2 + len(LANGUAGES)] == [f"<|{code}|>" for code in LANGUAGES]

    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert generation["lang_to_id"] == {f"<|{c}|>": tokenizer.convert_tokens_to_ids(f"<|{c}|>") for c in LANGUAGES}
    assert generation["task_to_id"] == {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe",
                                                                                                  "translate")}
    assert generation["no_timestamps_token_id"] == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert generation["decoder_start_token_id"] == tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert generation["forced_decoder_ids"] is None
    assert generation["is_multilingual"] is True and generation["max_length"] == 448


def test_same_arguments_give_identical_tokenizer_files_and_weights(tiny_model: Path, tmp_path: Path):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_whisper(tmp_path / "again")
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is left alone

    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
    first, second = load_file(tiny_model / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    other = load_file(build_tiny_whisper(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(other["model.decoder.embed_tokens.weight"], first["model.decoder.embed_tokens.weight"])


def test_default_texts_are_the_demo_corpus_sentences_and_texts_train_the_vocabulary():
    sentences = demo_sentences()
    assert sentences and all(s.strip() for s in sentences)
    assert "Les étudiants préparent leurs examens." in sentences

    # training stops early when no pair is left to merge: vocab_size is an upper bound
    tokenizer = build_tokenizer(["zygomatique zygomatique"] * 20, vocab_size=300)
    assert 256 < tokenizer.convert_tokens_to_ids("<|endoftext|>") <= 300
    assert tokenizer.tokenize("zygomatique") == ["zygomatique"]
    with pytest.raises(ValueError, match="at least 256"):
        build_tokenizer(["a"], vocab_size=100)


def test_french_prefix_tokens(tiny_model: Path):
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    tokenizer.set_prefix_tokens(language="french", task="transcribe")
    assert tokenizer.prefix_tokens == prompt(tokenizer)
    ids = tokenizer("Bonjour.").input_ids
    assert ids[:4] == prompt(tokenizer) and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("text", ["Aujourd'hui, l'été est là.", "Ça coûte 3,5 € à l'œil nu ; où est-il ?"])
def test_decode_round_trips_french_text(tiny_model: Path, text: str):
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    tokenizer.set_prefix_tokens(language="french", task="transcribe")
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids[4:-1]  # every byte has a token: nothing falls back to unknown


def test_generate_forces_french_transcription(tiny_model: Path):
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    features = noise_features(tiny_model)
    assert features.shape == (1, 80, 3000)

    out = model.generate(features, language="fr", task="transcribe", max_new_tokens=5, return_dict_in_generate=True)
    sequence = out.sequences[0].tolist()
    assert sequence[:4] == prompt(tokenizer)
    assert 4 < len(sequence) <= 4 + 5
    assert all(0 <= t < model.config.vocab_size for t in sequence)

    # the plain call, one pass as the project decodes (a random model emits timestamp tokens, which would send
    # transformers round its seek loop again): the prompt, then at most 5 new tokens
    plain = model.generate(features, language="fr", max_new_tokens=5, force_unique_generate_call=True)
    assert plain.shape[0] == 1 and plain[0, :4].tolist() == prompt(tokenizer) and 5 <= plain.shape[1] <= 4 + 5


def test_asr_pipeline_transcribes_a_16khz_array(tiny_model: Path):
    asr = pipeline("automatic-speech-recognition", model=str(tiny_model))
    audio = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)
    result = asr({"raw": audio, "sampling_rate": 16000}, generate_kwargs={"language": "fr", "max_new_tokens": 5})
    assert isinstance(result, dict) and isinstance(result["text"], str)


def test_128_mel_bins_variant(tmp_path: Path):
    folder = build_tiny_whisper(tmp_path / "tiny128", n_mels=128)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    assert model.config.num_mel_bins == 128
    assert WhisperProcessor.from_pretrained(folder).feature_extractor.feature_size == 128
    features = noise_features(folder)
    assert features.shape == (1, 128, 3000)
    out = model.generate(features, language="fr", max_new_tokens=3, force_unique_generate_call=True)
    assert 5 <= out.shape[1] <= 4 + 3
