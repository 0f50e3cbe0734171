"""The model card (README.md) of a delivered model, with the `model-index` block the event's leaderboard read:
task automatic-speech-recognition, dataset mozilla-foundation/common_voice_11_0 with the language as config,
split test, metric wer (normalised, in percent)."""

from __future__ import annotations

from pathlib import Path

import yaml

CV11 = "mozilla-foundation/common_voice_11_0"


def _dataset(source: dict, language: str) -> dict:
    location = str(source.get("location", ""))
    if source.get("kind") in ("cv-hub", "cv") and ("common_voice_11" in location or source.get("kind") == "cv-hub"):
        return {"name": "Common Voice 11.0", "type": CV11, "config": language, "split": "test", "args": language}
    return {"name": Path(location).name or location, "type": location, "config": language, "split": "test"}


def write_model_card(folder: Path, *, name: str, base_model: str, language: str, source: dict, report: dict,
                     steps: int, selected: str) -> Path:
    dataset = _dataset(source, language)
    metrics = [{"type": "wer", "value": round(report["wer"], 2), "name": "Wer"},
               {"type": "wer", "value": round(report["wer_orthographic"], 2), "name": "Orthographic Wer"},
               {"type": "cer", "value": round(report["cer"], 2), "name": "Cer"}]
    front = {
        "language": [language], "base_model": base_model, "tags": ["whisper", "automatic-speech-recognition"],
        "datasets": [dataset["type"]], "metrics": ["wer"],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
            "dataset": dataset, "metrics": metrics}]}],
    }
    row = (f"| {report['split']} | {report['wer']:.2f} | {report['wer_orthographic']:.2f} | {report['cer']:.2f} | "
           f"{report['scored']} of {report['samples']} |")
    body = f"""# {name}

Fine-tuned from `{base_model}` for {language} transcription with whisper-launcher ({steps} optimizer steps;
weights: {selected}).

| split | WER (normalised) | orthographic WER | CER | clips scored |
| --- | --- | --- | --- | --- |
{row}

WER follows the Whisper fine-tuning event's rule: transformers' `BasicTextNormalizer` on prediction and
reference, references that normalise to nothing left out, greedy decoding with the language token forced.
"""
    path = Path(folder) / "README.md"
    path.write_text(f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n{body}", encoding="utf-8")
    return path
