"""Scoring follows the event's rule and equals an independent jiwer computation."""

from __future__ import annotations

import jiwer
import pytest
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from launcher.evaluation.scoring import edit_distance, score

PAIRS = [
    ("Bonjour, comment allez-vous ?", "bonjour comment allez vous"),
    ("Il fait beau aujourd'hui.", "il fait très beau aujourd hui"),
    ("« ... »", "quelque chose"),  # normalises to nothing: left out, as the event did
    ("Le chat dort sur le canapé.", ""),  # empty prediction: all deletions
    ("Nous partons en vacances au mois d'août.", "nous partons en vacance au mois d'août"),
    ("L'été 2022 était chaud !", "l'été deux mille vingt-deux était chaud"),
]


def predictions() -> list[dict]:
    return [{"id": str(i), "reference": r, "prediction": p} for i, (r, p) in enumerate(PAIRS)]


def test_normalised_wer_equals_jiwer_on_the_same_predictions():
    norm = BasicTextNormalizer()
    scores, rows = score(predictions(), norm)
    kept = [(norm(r).strip(), norm(p).strip()) for r, p in PAIRS if norm(r).strip()]
    assert scores["scored"] == len(kept) == 5 and scores["dropped_empty_references"] == 1
    expected = 100 * jiwer.wer([r for r, _ in kept], [p for _, p in kept])
    assert scores["wer"] == pytest.approx(expected, abs=1e-9)
    expected_cer = 100 * jiwer.cer([" ".join(r.split()) for r, _ in kept], [" ".join(p.split()) for _, p in kept])
    assert scores["cer"] == pytest.approx(expected_cer, abs=1e-9)
    assert sum(r["errors"] for r in rows if r["scored"]) == round(expected * scores["reference_words"] / 100)
    assert [r["scored"] for r in rows] == [True, True, False, True, True, True]


def test_orthographic_wer_equals_jiwer_without_normalisation():
    norm = BasicTextNormalizer()
    scores, _ = score(predictions(), norm)
    kept = [(r, p) for r, p in PAIRS if norm(r).strip()]
    expected = 100 * jiwer.wer([r for r, _ in kept], [p for _, p in kept])
    assert scores["wer_orthographic"] == pytest.approx(expected, abs=1e-9)


def test_per_sample_errors_match_jiwer_measures():
    for ref, hyp in [("a b c d", "a x c"), ("un deux trois", "un deux trois quatre cinq"), ("x y", "y z")]:
        out = jiwer.process_words(ref, hyp)
        assert edit_distance(ref.split(), hyp.split()) == out.substitutions + out.deletions + out.insertions
    assert edit_distance(["x", "y"], []) == 2


def test_perfect_predictions_score_zero():
    rows = [{"id": "1", "reference": "Un, deux, trois.", "prediction": "un deux trois"}]
    scores, _ = score(rows, BasicTextNormalizer())
    assert scores["wer"] == 0.0 and scores["cer"] == 0.0 and scores["wer_orthographic"] > 0
