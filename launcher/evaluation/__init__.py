"""One evaluation, used by the training loop and by `python -m launcher evaluate`, scored as the event scored it.

Scoring (the event's rule): WER in percent over the whole split, after transformers' BasicTextNormalizer on
both sides, references that normalise to nothing left out; greedy decoding with the language token forced.
Orthographic WER (no normalisation) and CER (normalised characters) are reported beside it. Error counts
are counted per sample (Levenshtein distance), so each prediction line carries its own errors; a test checks
the totals against an independent jiwer computation.

Distribution: each rank decodes a disjoint, contiguous slice of the split (sizes differ by at most one, a rank may
have none), so every sample is decoded exactly once; predictions are gathered to rank 0, which scores and writes
the report. Decoding runs on a plain copy of the model (`launcher.model.materialize`: under ZeRO-3 the weights are
gathered once, chunk by chunk, in the same order on every rank), so no collective runs while a rank decodes and
ranks that decode different numbers of tokens, or none, never wait on each other.

Long-form evaluation (`longform`) goes the same way with recordings joined from the split's clips in place
of the clips.

Modules: `items` (a split's clips and where their features lie), `decode` (short-form), `longform` (recordings
joined from clips), `scoring` (the event's rule), `reports` (what is written), `run` (one evaluation on every rank),
`standalone` (`python -m launcher evaluate`).
"""
