"""Shipping a model: the CTranslate2 export agrees with the project's own evaluation under faster-whisper, the
card validates with huggingface_hub's parser, and `push --dry-run` shows what would be uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.audio import decode_audio
from launcher.evaluation.scoring import edit_distance
from tests.conftest import DEMO, ZERO2_STEPS, run_cli

pytestmark = pytest.mark.slow
SPLITS = ("validation", "test")


@pytest.fixture(scope="module")
def delivered(zero2_run) -> Path:
    """The suite's trained model (conftest's zero2_run): a tiny model with Whisper's token ids (CTranslate2
    recognises a multilingual Whisper by its vocabulary) that has learnt the 8 validation clips and transcribes them
    in different lengths, delivered with its card, and its evaluation's predictions on validation (at the last
    step) and test (at the end)."""
    return zero2_run


def own_predictions(run_dir: Path) -> dict[str, dict]:
    lines = [line for split in SPLITS for line in (run_dir / "eval" / f"{split}-step-{ZERO2_STEPS}.predictions.jsonl")
             .read_text().splitlines()]
    return {row["id"]: row for row in map(json.loads, lines)}


def faster_whisper_transcripts(export: Path, ids, compute_type: str) -> dict[str, str]:
    from faster_whisper import WhisperModel

    settings = json.loads((export / "whisper_launcher.json").read_text())
    model = WhisperModel(str(export), device="cpu", compute_type=compute_type, cpu_threads=2)
    out = {}
    for clip_id in ids:
        audio = decode_audio((DEMO / "clips" / f"{clip_id}.mp3").read_bytes())  # the audio the shards were made from
        segments, _ = model.transcribe(audio, **settings["faster_whisper_transcribe"])
        out[clip_id] = "".join(s.text for s in segments).strip()
    return out


def wer(rows: dict[str, dict], hyps: dict[str, str]) -> float:
    from launcher.evaluation.scoring import normalizer_for

    norm = normalizer_for("fr")
    errors = sum(edit_distance(norm(r["reference"]).split(), norm(hyps[i]).split()) for i, r in rows.items())
    return 100 * errors / sum(len(norm(r["reference"]).split()) for r in rows.values())


def test_faster_whisper_on_the_ct2_export_transcribes_as_the_evaluation_did(delivered, tmp_path):
    own = own_predictions(delivered)  # transcripts that differ from clip to clip: zero2_run checks it once
    proc = run_cli("export", str(delivered), "--quantization", "float32", "--out", str(tmp_path / "f32"))
    assert "written:" in proc.stdout
    export = tmp_path / "f32"
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json",
            "whisper_launcher.json", "README.md"} <= {p.name for p in export.iterdir()}
    settings = json.loads((export / "whisper_launcher.json").read_text())
    assert (settings["language"], settings["task"], settings["num_beams"]) == ("fr", "transcribe", 1)
    f32 = faster_whisper_transcripts(export, own, "float32")
    same = sum(f32[i] == own[i]["prediction"] for i in own)
    print(f"float32: {same} of {len(own)} transcripts identical")  # the figure for the note
    assert same >= 0.99 * len(own), {i: (own[i]["prediction"], f32[i]) for i in own if f32[i] != own[i]["prediction"]}

    run_cli("export", str(delivered), "--quantization", "int8", "--out", str(tmp_path / "int8"))
    int8 = faster_whisper_transcripts(tmp_path / "int8", own, "int8")
    own_wer, int8_wer = wer(own, {i: r["prediction"] for i, r in own.items()}), wer(own, int8)
    print(f"WER: evaluation {own_wer:.2f}, faster-whisper int8 {int8_wer:.2f}")
    assert abs(int8_wer - own_wer) <= 0.5


def test_the_card_validates_with_the_hubs_parser_and_push_dry_run_lists_the_upload(delivered, demo_shards):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(delivered / "final" / "README.md")
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "run" and card.data.base_model and card.data.language == ["fr"]
    test = json.loads((delivered / "eval" / f"test-step-{ZERO2_STEPS}.json").read_text())
    by_metric = {r.metric_name: r for r in results}
    assert set(by_metric) == {"Wer", "Orthographic Wer", "Cer"}
    assert by_metric["Wer"].metric_value == round(test["wer"], 2) and by_metric["Wer"].dataset_split == "test"
    source = json.loads((demo_shards["shards"] / "index.json").read_text())["source"]
    assert by_metric["Wer"].dataset_config == "fr" and by_metric["Wer"].dataset_type == source["location"]
    assert "optim:" in card.content and f"max_steps: {ZERO2_STEPS}" in card.content, "the recipe, embedded"
    proc = run_cli("push", str(delivered), "--repo", "someone/tiny-fr", "--dry-run", env={"HF_TOKEN": "hf_PLANTED42"})
    listing = proc.stdout.split("model card (README.md):")[0]
    listed = {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}
    assert listed == {p.name for p in (delivered / "final").iterdir()}
    assert "would upload" in proc.stdout and "model-index" in proc.stdout and "hf_PLANTED42" not in proc.stdout
    bad = run_cli("push", str(delivered), "--repo", "not a repo", "--dry-run", check=False)
    assert bad.returncode == 2 and "expected OWNER/NAME" in bad.stderr
