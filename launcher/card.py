"""The model card (README.md) of a delivered model, built with huggingface_hub's ModelCard and EvalResult, so its
`model-index` block is what the Hub (and the event's leaderboard) parse: per language, task
automatic-speech-recognition, the dataset (Common Voice 11.0 with the language as config, else the shards' source),
split test, metrics wer (normalised, in percent), orthographic wer and cer."""

from __future__ import annotations

from pathlib import Path

CV11 = "mozilla-foundation/common_voice_11_0"
TASK = "automatic-speech-recognition"


def dataset_of(source: dict) -> tuple[str, str]:
    """(dataset id, display name) of a shard set's source (index.json)."""
    location = str(source.get("location", ""))
    if source.get("kind") in ("cv-hub", "cv") and ("common_voice_11" in location or source.get("kind") == "cv-hub"):
        return CV11, "Common Voice 11.0"
    return location, Path(location).name or location


def eval_results(sets, reports: dict[str, dict]) -> list:
    """One EvalResult per language and metric, from the test reports ({language: report})."""
    from huggingface_hub import EvalResult

    out = []
    for s in sets:
        report = reports[s.language]
        dataset, name = dataset_of(s.index.source)
        common = {"task_type": TASK, "task_name": "Automatic Speech Recognition", "dataset_type": dataset,
                  "dataset_name": name, "dataset_config": s.language, "dataset_split": "test",
                  "dataset_args": {"language": s.language} if dataset == CV11 else None}
        for metric, key, label in (("wer", "wer", "Wer"), ("wer", "wer_orthographic", "Orthographic Wer"),
                                   ("cer", "cer", "Cer")):
            out.append(EvalResult(**common, metric_type=metric, metric_value=round(report[key], 2),
                                  metric_name=label))
    return out


def model_card(*, name: str, base_model: str, sets, reports: dict[str, dict], steps: int, selected: str,
               recipe_text: str | None = None):
    """The card as a huggingface_hub ModelCard (not yet written)."""
    from huggingface_hub import ModelCard, ModelCardData

    from launcher.evaluation.scoring import mean_wer

    languages = [s.language for s in sets]
    data = ModelCardData(model_name=name, base_model=base_model, language=languages,
                         datasets=sorted({dataset_of(s.index.source)[0] for s in sets}),
                         metrics=["wer", "cer"], tags=["whisper", TASK, "whisper-launcher"], pipeline_tag=TASK,
                         library_name="transformers", eval_results=eval_results(sets, reports))
    rows = "\n".join(f"| {lang} | {r['split']} | {r['wer']:.2f} | {r['wer_orthographic']:.2f} | {r['cer']:.2f} | "
                     f"{r['scored']} of {r['samples']} |" for lang, r in reports.items())
    mean = ""
    if len(reports) > 1:
        mean = (f"\nMean WER over the {len(reports)} languages (each counting once): "
                f"{mean_wer(reports):.2f}.\n")
    recipe = (f"\n## Recipe\n\n<details><summary>the recipe this model was trained with</summary>\n\n```yaml\n"
              f"{recipe_text.rstrip()}\n```\n\n</details>\n") if recipe_text else ""
    body = f"""# {name}

Fine-tuned from `{base_model}` for {", ".join(languages)} transcription with whisper-launcher ({steps} optimizer
steps; weights: {selected}).

| language | split | WER (normalised) | orthographic WER | CER | clips scored |
| --- | --- | --- | --- | --- | --- |
{rows}
{mean}
WER follows the Whisper fine-tuning event's rule: transformers' `BasicTextNormalizer` on prediction and
reference, references that normalise to nothing left out, greedy decoding with the language token forced.
{recipe}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(folder: Path, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    model_card(**kwargs).save(path)
    return path
