"""Scoring as the event scored: WER in percent over the whole split after transformers' BasicTextNormalizer on
both sides, references that normalise to nothing left out; orthographic WER and CER beside it; errors counted per
sample (Levenshtein), so each prediction line carries its own."""

from __future__ import annotations


def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two token sequences, in C++
    (rapidfuzz): a 16 k-clip test set's character alignments take a second, not minutes."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(ref, hyp)


def normalizer_for(language: str, tokenizer=None):
    """The event's normaliser: BasicTextNormalizer, or Whisper's EnglishTextNormalizer for English."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if language in ("en", "english"):
        return EnglishTextNormalizer(getattr(tokenizer, "english_spelling_normalizer", None) or {})
    return BasicTextNormalizer()


def score(predictions: list[dict], normalize) -> tuple[dict, list[dict]]:
    """Corpus-level WER/CER in percent; each prediction gains its normalised texts and error counts. A prediction
    of a joined recording lists its parts (`references`: the clips' texts, `predictions`: the decoded segments'),
    normalised one by one so that brackets, whose content the normaliser drops, cannot reach over a join."""

    def normalized(p: dict, key: str) -> str:
        return " ".join(" ".join(normalize(t).split()) for t in p.get(key + "s", [p[key]])).strip()

    totals = {"errors": 0, "words": 0, "ortho_errors": 0, "ortho_words": 0, "char_errors": 0, "chars": 0}
    scored, dropped = [], 0
    for p in predictions:
        ref_n, hyp_n = normalized(p, "reference"), normalized(p, "prediction")
        row = {**p, "reference_normalized": ref_n, "prediction_normalized": hyp_n}
        if not ref_n.split():
            dropped += 1
            row["scored"] = False
            scored.append(row)
            continue
        ref_w, hyp_w = ref_n.split(), hyp_n.split()
        row.update(scored=True, errors=edit_distance(ref_w, hyp_w), words=len(ref_w))
        totals["errors"] += row["errors"]
        totals["words"] += row["words"]
        totals["char_errors"] += edit_distance(list(" ".join(ref_w)), list(" ".join(hyp_w)))
        totals["chars"] += len(" ".join(ref_w))
        ortho_ref = p["reference"].split()
        totals["ortho_errors"] += edit_distance(ortho_ref, p["prediction"].split())
        totals["ortho_words"] += len(ortho_ref)
        scored.append(row)

    def pct(a: str, b: str) -> float:
        return 100.0 * totals[a] / totals[b] if totals[b] else 0.0

    scores = {"wer": pct("errors", "words"), "wer_orthographic": pct("ortho_errors", "ortho_words"),
              "cer": pct("char_errors", "chars"), "samples": len(predictions), "scored": len(predictions) - dropped,
              "dropped_empty_references": dropped, "reference_words": totals["words"]}
    return scores, scored


def mean_wer(reports: dict[str, dict]) -> float:
    """The languages' WERs averaged, each language counting once (not weighted by its words)."""
    return sum(r["wer"] for r in reports.values()) / len(reports)
