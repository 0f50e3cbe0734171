"""A tiny random Whisper that loads with the real transformers classes, built offline and deterministically.

Tests and the CPU demo need a Whisper model folder (weights, config, generation config, tokenizer, feature
extractor) that `WhisperForConditionalGeneration`, `WhisperProcessor`, `WhisperTokenizerFast` and the ASR
`pipeline` load as they would a real checkpoint, without any download. `build_tiny_whisper` writes one:

- a byte-level BPE tokenizer trained with `tokenizers` on the bundled corpus's sentences, followed by Whisper's
  special tokens in Whisper's order, so `<|startoftranscript|>` comes right after `<|endoftext|>` and the language
  tokens right after it, as transformers' Whisper code assumes;
- a small random `WhisperForConditionalGeneration`, by default with the real 1500-position encoder (30 s of
  features, the same [batch, n_mels, 3000] input as the full-size models); `max_source_positions` gives it a shorter
  window (the test suite's 6 s, most of its speed), which the project follows everywhere (`model.input_frames`) and
  the feature extractor's `chunk_length` says;
- Whisper's 1501 timestamp tokens `<|0.00|>` .. `<|30.00|>` right after the special tokens, as plain added tokens
  (transformers finds them at the last special id + 1), so timestamped labels and long-form generation work;
- a generation config with the language and task tables `generate(language=..., task=...)` reads.

Same arguments give byte-identical tokenizer files and identical weights.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.assets import DEMO_CORPUS

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizer

EOT = "<|endoftext|>"
SOT = "<|startoftranscript|>"
TASKS = ("translate", "transcribe")


def demo_sentences(corpus: Path = DEMO_CORPUS) -> list[str]:
    """The non-empty `sentence` column of the corpus's train, dev and test TSVs, in that order."""
    sentences = []
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        with open(corpus / name, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            sentences += [row["sentence"] for row in rows if row.get("sentence") and row["sentence"].strip()]
    return sentences


def language_tokens(v2: bool = False) -> list[str]:
    """transformers' 100 language tokens (large-v3's); `v2`: the 99 of Whisper v1/v2 (without Cantonese)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return [f"<|{code}|>" for code in LANGUAGES if not (v2 and code == "yue")]


def special_tokens(v2: bool = False) -> list[str]:
    """Whisper's special tokens in Whisper's order (without the timestamp tokens)."""
    return [EOT, SOT, *language_tokens(v2), "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
            "<|nocaptions|>", "<|notimestamps|>"]


def timestamp_tokens() -> list[str]:
    """<|0.00|> .. <|30.00|>, every 0.02 s, as in Whisper's vocabulary."""
    return [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a GPT-2-style byte-level BPE (the pre-tokenizer Whisper uses) trained on `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # every byte in the alphabet, so text the corpus never showed (other accents, digits) still encodes
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


WHISPER_EOT_ID = 50257  # <|endoftext|> in multilingual Whisper (English-only models: 50256)


def build_tokenizer(texts: Iterable[str], vocab_size: int, whisper_ids: bool = False) -> WhisperTokenizer:
    """`whisper_ids`: unused entries fill the BPE part up to Whisper's 50257 text tokens (the last one empty, as in
    multilingual Whisper) and the languages are v2's 99, so every token has its id in multilingual Whisper v2 (51865
    in all), which converters that recognise a multilingual Whisper by its vocabulary (CTranslate2, whisper.cpp)
    need."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocab, merges = train_bpe(texts, vocab_size)
    if whisper_ids:  # never produced: no merge leads to them; multilingual Whisper's id 50256 is the empty token
        vocab = {**vocab, **{f"<unused{i}>": i for i in range(len(vocab), WHISPER_EOT_ID - 1)}, "": WHISPER_EOT_ID - 1}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT,
                                 pad_token=EOT)
    # <|endoftext|> is already added (as eos); the rest follow it in order, so ids are len(vocab) + position
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens(v2=whisper_ids)[1:]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False)
                          for t in timestamp_tokens()])
    return tokenizer


def special_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    v2 = "<|yue|>" not in tokenizer.get_vocab()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens(v2)}
    expected = list(range(ids[EOT], ids[EOT] + len(ids)))
    if list(ids.values()) != expected:
        raise RuntimeError(f"special tokens are not consecutive in Whisper's order: {ids}")
    return ids


def build_config(ids: dict[str, int], vocab_size: int, *, n_mels: int, d_model: int, layers: int,
                 heads: int, max_source_positions: int = 1500) -> WhisperConfig:
    from transformers import WhisperConfig

    eot = ids[EOT]
    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_source_positions=max_source_positions, max_target_positions=448,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=ids[SOT], suppress_tokens=[],
        begin_suppress_tokens=[eot])


def build_generation_config(ids: dict[str, int]) -> GenerationConfig:
    """What WhisperGenerationMixin reads to build the prompt [sot, language, task, notimestamps] and stop."""
    from transformers import GenerationConfig

    eot = ids[EOT]
    return GenerationConfig(
        decoder_start_token_id=ids[SOT], bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        is_multilingual=True, lang_to_id={token: ids[token] for token in language_tokens() if token in ids},
        task_to_id={task: ids[f"<|{task}|>"] for task in TASKS}, no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"], forced_decoder_ids=None, suppress_tokens=[],
        begin_suppress_tokens=[eot], max_initial_timestamp_index=50)


def build_tiny_whisper(out: Path, *, n_mels: int = 80, texts: Iterable[str] | None = None, vocab_size: int = 400,
                       seed: int = 0, d_model: int = 64, layers: int = 2, heads: int = 4,
                       model_vocab_size: int | None = None, whisper_ids: bool = False,
                       max_source_positions: int = 1500) -> Path:
    """Write a tiny random Whisper folder to `out` and return `out`.

    `texts` trains the tokenizer (default: the bundled French corpus's sentences); `vocab_size` bounds the BPE
    tokens only (fewer when the texts run out of pairs to merge), the special tokens come after them.
    `model_vocab_size` pads the model's embedding and output rows beyond the tokenizer's (large-v3 has 51866) for
    models that must have a real Whisper's shape; those ids decode to nothing. `whisper_ids` gives every token its
    id in Whisper (`build_tokenizer`). Same arguments, same tokenizer files and weights.
    """
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    if max_source_positions % 50:
        raise ValueError(f"max_source_positions must be a multiple of 50 (whole seconds), got {max_source_positions}")
    out = Path(out)
    tokenizer = build_tokenizer(demo_sentences() if texts is None else texts, vocab_size, whisper_ids)
    ids = special_ids(tokenizer)
    if model_vocab_size is not None and model_vocab_size < len(tokenizer):
        raise ValueError(f"model_vocab_size {model_vocab_size} is less than the tokenizer's {len(tokenizer)} tokens")
    config = build_config(ids, model_vocab_size or len(tokenizer), n_mels=n_mels, d_model=d_model, layers=layers,
                          heads=heads, max_source_positions=max_source_positions)
    # seeded in a forked RNG so building a model leaves the caller's random stream as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = build_generation_config(ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the window in seconds: 2 frames of 10 ms per encoder position
    WhisperFeatureExtractor(feature_size=n_mels, chunk_length=max_source_positions // 50).save_pretrained(out)
    return out
