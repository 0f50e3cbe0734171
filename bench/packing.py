#!/usr/bin/env python3
"""Packing: does packed training keep the short-form WER the event scores, and win on long-form? (issue 11, then the
"packing that wins" issue).

Real pretrained whisper-base (../shared/tools/whisper_base_offline.py) fine-tuned on a synthetic German corpus
(../shared/tools/synth_cv_corpus.py: fortune sentences spoken by espeak-ng, Common Voice-like lengths of ~2-8 s,
speaker-disjoint splits, 1/8 of the clips in test), started as a user starts it (`deepspeed --num_gpus 1 train_ds.py
--recipe recipes/tiny_demo.yaml --set ...`, `launcher.testing.realruns`: encoder frozen, batch 8, fp32, lr 1e-5
constant). Each arm is a set of `--set` overrides; each (arm, seed) is one run of the same number of optimizer
steps: every step is 8 windows of 30 s through the encoder, so equal steps is equal encoder work, whatever a window
holds. Each run is scored on the first --test-clips clips of the test split, short-form (`launcher evaluate`, greedy,
as the event scored: WER, runaway clips, WER without them) and long-form (`--long-form 30`: WER and the share of
recordings whose timestamps are inside the audio), and zero-shot once. Per arm: mean and spread over seeds.

The unpacked arm's seed-0 run (or any arm in --curve-arms) also evaluates a fixed validation subset every
--curve-every steps during training: its learning curve says whether the budget is long enough for its WER to have
stopped moving fast.

Everything finished is kept under bench/.cache/packing-runs/<arm>-s<seed>-n<steps>/ (a run, then its two
evaluations, each with a marker written last), so an interrupted invocation resumes where it stopped, and a later
invocation with other arms adds to the same results file (runs are merged by key; each arm's figures are recomputed
over its runs). A run whose arm's overrides changed since it was cached is trained again.

    python bench/packing.py                                   # the baseline: unpacked and packed, seeds 0 and 1
    python bench/packing.py --arms packed-single0.25 --seeds 0   # one more arm (a cause tested), one seed
    python bench/packing.py --arms packed --seeds 0 --feature-join   # ... and the joined-features measurement
    python bench/packing.py --list                            # the arms and what each one tests
    python bench/packing.py --report                          # print the table of what --out holds

Writes bench/results/packing.json after every finished piece of work, and prints a table. The first version of this
benchmark (both arms for the same wall-clock budget, 200 test clips, one seed) left its figures in
bench/results/packing-equal-time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from launcher.testing import assets, realruns
from launcher.testing.commands import REPO
from launcher.testing.commands import TINY_RECIPE as RECIPE
from launcher.testing.realruns import runaways, throughput

RESULTS = REPO / "bench" / "results" / "packing.json"
CACHE = assets.BENCH_CACHE
WORK = CACHE / "packing-runs"
LANG = "de"
PACKED = ["data.pack.enabled=true", "data.pack.max_seconds=30"]

# name: (overrides after realruns.COMMON, what the arm tests)
ARMS: dict[str, tuple[list[str], str]] = {
    "unpacked": (["data.pack.enabled=false"], "one clip per window (the event's reference recipe)"),
    "packed": ([*PACKED, "data.timestamp_probability=0.5"],
               "packing as it was (off by default): full 30 s windows, timestamps on half the windows"),
    "packed-ts0.2": ([*PACKED, "data.timestamp_probability=0.2"],
                     "cause: timestamps on too many windows (distil-whisper recommends 0.2: high shares hurt WER)"),
    "packed-ts0": ([*PACKED, "data.timestamp_probability=0"], "cause: timestamps at all"),
    "packed-lr2.5e-5": ([*PACKED, "data.timestamp_probability=0.5", "optim.lr=2.5e-5"],
                        "cause: learning rate per step (a packed step holds ~6x the tokens: sqrt(6) x 1e-5)"),
    "packed-prompt0.2": ([*PACKED, "data.timestamp_probability=0.5", "data.prompt_probability=0.2"],
                         "cause: prompts (distil-whisper conditions 20% of windows on the previous text)"),
    "packed-same-speaker": ([*PACKED, "data.timestamp_probability=0.5", "data.pack.same_speaker=true"],
                            "cause: mixed voices in a window (distil-whisper joins one speaker's clips only)"),
    "packed-single0.25": ([*PACKED, "data.timestamp_probability=0.5", "data.pack.single_probability=0.25"],
                          "cause: full windows only (a short test clip is one clip and ~25 s of silence, which "
                          "packed training never shows): a quarter of the windows hold one clip"),
    "packed-single0.25-ts0.2": ([*PACKED, "data.timestamp_probability=0.2", "data.pack.single_probability=0.25"],
                                "fix candidate: a quarter single-clip windows, timestamps on a fifth"),
}


def arm_overrides(arm: str, seed: int) -> list[str]:
    return [f"model.language={LANG}", *ARMS[arm][0], f"seed={seed}"]


def read_json(path: Path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json(path: Path, data) -> None:
    """Written whole to a temporary name, then renamed: a file that exists is complete."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---- one run: train, evaluate short-form, evaluate long-form; each step cached with a marker written last ----

def train_run(model: Path, shards: Path, arm: str, seed: int, steps: int, curve: tuple[int, int] | None) -> dict:
    """The run's training summary (trained now, or found in the cache with the same overrides)."""
    run = WORK / f"{arm}-s{seed}-n{steps}"
    overrides = arm_overrides(arm, seed)
    if curve:
        every, samples = curve
        overrides += [f"eval.every_steps={every}", f"eval.max_samples={samples}", "eval.max_new_tokens=225",
                      "eval.batch_size_per_gpu=16"]
    marker = read_json(run / "trained.json")
    if marker and marker["overrides"] == overrides:
        return marker
    shutil.rmtree(run, ignore_errors=True)
    print(f"[{time.strftime('%H:%M')}] train {run.name}: {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    log = realruns.train(model, shards, run, overrides, steps)
    wall = time.perf_counter() - t0
    summary = {"arm": arm, "seed": seed, "steps": steps, "overrides": overrides, **throughput(log),
               "training_wall_s": sum(r["window_s"] for r in log), "command_wall_s": wall,
               "loss_curve": [[r["step"], round(r["loss"], 4)] for r in log],
               "date": time.strftime("%Y-%m-%d %H:%M")}
    if curve:
        summary["validation_curve"] = validation_curve(run)
    write_json(run / "trained.json", summary)
    print(f"  {summary['seconds_per_step']:.1f} s/step, {summary['audio_s_per_s']:.2f} audio s/s, final loss "
          f"{summary['final_loss']:.3f}", flush=True)
    return summary


def validation_curve(run: Path) -> list[dict]:
    """The in-training validation reports: [{step, wer, runaway_clips, wer_without_runaways}]."""
    points = []
    for report in sorted((run / "eval").glob("validation-step-*.json"), key=lambda p: int(p.stem.split("-")[-1])):
        r = json.loads(report.read_text())
        preds = report.with_suffix(".predictions.jsonl")
        points.append({"step": int(report.stem.split("-")[-1]), "wer": r["wer"], "samples": r.get("samples"),
                       **(runaways(preds) if preds.is_file() else {})})
    return points


def evaluate(model: Path, shards: Path, out: Path, test_clips: int, long_form: float | None,
             split: str = "test") -> dict:
    """A short- or long-form report (cached in `out` with a marker), with runaway clips and timestamp figures."""
    marker = out.with_name(out.name + ".json")
    done = read_json(marker)
    if done and done.get("test_clips") == test_clips and done.get("model") == str(model):
        return done
    print(f"[{time.strftime('%H:%M')}] evaluate {out.relative_to(WORK)} ({split}, {test_clips} clips"
          f"{f', long-form {long_form:g} s' if long_form else ''})", flush=True)
    report = realruns.evaluate(model, shards, out, split=split, long_form=long_form, max_samples=test_clips)
    name = f"{split}-long-{long_form:g}s" if long_form else split
    predictions = out / f"{name}.predictions.jsonl"
    keep = ("wer", "wer_orthographic", "cer", "samples", "scored", "reference_words", "eval_seconds",
            "recordings", "clips", "timestamps_monotone", "timestamps_inside")
    summary = {k: report[k] for k in keep if k in report}
    summary.update(runaways(predictions))
    summary.update(long_form_timestamps(predictions) if long_form else continuations(predictions))
    summary.update({"test_clips": test_clips, "model": str(model), "split": name})
    write_json(marker, summary)
    print(f"  WER {summary['wer']:.2f}, runaway clips {summary['runaway_clips']}"
          f"{', timestamps inside ' + format(summary['timestamps_inside'], '.0%') if long_form else ''}", flush=True)
    return summary


def continuations(predictions: Path) -> dict:
    """Short-form clips whose prediction goes on past the reference: over 1.5x its words + 2 (runaways included),
    and the words predicted beyond the reference's count over all clips (a model that keeps talking after a clip
    ends adds them)."""
    rows = [json.loads(x) for x in predictions.read_text().splitlines()]
    rows = [r for r in rows if r.get("scored")]
    extra = [len(r["prediction_normalized"].split()) - r["words"] for r in rows]
    return {"clips_continued": sum(len(r["prediction_normalized"].split()) > 1.5 * r["words"] + 2 for r in rows),
            "extra_words_per_clip": sum(max(0, e) for e in extra) / max(1, len(rows)),
            "empty_predictions": sum(not r["prediction_normalized"].strip() for r in rows)}


def long_form_timestamps(predictions: Path) -> dict:
    """How far the last segment of each recording ends from its audio's end (seconds; > 0: past it), and the
    recordings with text decoded past the end."""
    rows = [json.loads(x) for x in predictions.read_text().splitlines()]
    over = [r["segments"][-1][1] - r["seconds"] for r in rows if r.get("segments")]
    return {"last_end_minus_audio_s_mean": statistics.fmean(over) if over else None,
            "last_end_minus_audio_s_median": statistics.median(over) if over else None,
            "recordings_past_end_over_1s": sum(o > 1.0 for o in over),
            "recordings_without_segments": sum(not r.get("segments") for r in rows)}


def end_of_text(models: dict[str, Path], base: Path, shards: Path, clips: int) -> dict[str, dict]:
    """Does a model want to stop when a short clip's text is complete? Teacher-forced on the first `clips` test
    clips (padded to 30 s, as evaluation presents them) with the reference as training labels it (plain layout,
    normalised text as the recipe trains): P(<|endoftext|>) right after the text, the share of clips where it is
    not the most likely next token (greedy decoding would go on even after a perfect transcript), and the mean
    per-token loss of the reference (a measure of what was learnt that runaways cannot sway). The encoder is frozen
    in every run, so its outputs are computed once (checked: each model's encoder weights equal the base's)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from launcher.data.labels import LabelEncoder
    from launcher.evaluation.items import scan_split
    from launcher.features import pad_batch, stack_features
    from launcher.shards.format import load_index

    todo = {name: m for name, m in models.items() if read_json(m.parent / f"eot-{clips}.json") is None}
    out = {name: read_json(m.parent / f"eot-{clips}.json") for name, m in models.items() if name not in todo}
    if not todo:
        return out
    print(f"[{time.strftime('%H:%M')}] end-of-text probability on {clips} test clips: {', '.join(todo)}", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = WhisperTokenizerFast.from_pretrained(base)
    labels = LabelEncoder(tokenizer, LANG, "transcribe", normalize=True)
    items = scan_split(load_index(shards), "test", clips)
    targets = [labels(it.text) for it in items]
    reference = WhisperForConditionalGeneration.from_pretrained(base).eval()
    encoded = []
    with torch.no_grad():
        for i in range(0, len(items), 16):
            features = pad_batch(*stack_features([it.mel.load() for it in items[i:i + 16]]))
            encoded.append(reference.model.encoder(input_features=features).last_hidden_state)
    encoder_state = {k: v.clone() for k, v in reference.model.encoder.state_dict().items()}
    for name, folder in todo.items():
        model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        drift = max(float((v - encoder_state[k]).abs().max()) for k, v in model.model.encoder.state_dict().items())
        p_end, going_on, nll, tokens = [], 0, 0.0, 0
        with torch.no_grad():
            for b, hidden in enumerate(encoded):
                batch = targets[b * 16:(b + 1) * 16]
                width = max(len(t) for t in batch)
                inputs = torch.full((len(batch), width), labels.eot, dtype=torch.long)
                for j, t in enumerate(batch):
                    inputs[j, :len(t)] = torch.tensor([labels.start, *t[:-1]])
                logp = model(encoder_outputs=(hidden,), decoder_input_ids=inputs).logits.log_softmax(-1)
                for j, t in enumerate(batch):
                    last = len(t) - 1  # the position whose target is <|endoftext|>
                    p_end.append(float(logp[j, last, labels.eot].exp()))
                    going_on += int(logp[j, last].argmax()) != labels.eot
                    learnt = torch.tensor(t[3:])  # the text and <|endoftext|>, after <|lang|><|task|><|notimestamps|>
                    nll -= float(logp[j, torch.arange(3, len(t)), learnt].sum())
                    tokens += len(learnt)
        result = {"clips": len(items), "p_end_of_text_mean": statistics.fmean(p_end),
                  "p_end_of_text_median": statistics.median(p_end),
                  "clips_where_greedy_goes_on": going_on, "reference_loss_per_token": nll / tokens,
                  "encoder_max_abs_drift": drift}
        write_json(folder.parent / f"eot-{clips}.json", result)
        print(f"  {name}: P(eot) mean {result['p_end_of_text_mean']:.3f}, greedy goes on after the text in "
              f"{going_on}/{len(items)}, reference loss {result['reference_loss_per_token']:.3f}", flush=True)
        out[name] = result
    return out


def run_one(model: Path, shards: Path, arm: str, seed: int, args) -> dict:
    curve = (args.curve_every, args.curve_samples) if arm in args.curve_arms and seed == args.seeds[0] else None
    trained = train_run(model, shards, arm, seed, args.steps, curve)
    run = WORK / f"{arm}-s{seed}-n{args.steps}"
    short = evaluate(run / "final", shards, run / "eval-short", args.test_clips, None)
    long = evaluate(run / "final", shards, run / "eval-long", args.test_clips, args.long_form) \
        if args.long_form else {}
    return {"training": trained, "short_form": short, "long_form": long}


# ---- joined features against the joined audio (the packed windows' input) ----

def feature_join_difference(shards: Path, corpus: Path, clips: int = 60) -> dict:
    """Joined stored features against the joined audio's log-mel, for windows of consecutive test clips."""
    import numpy as np

    from launcher.audio import decode_audio
    from launcher.features import HOP_LENGTH, N_FRAMES, join_features, log_mel_spectrogram
    from launcher.shards.format import load_index
    from launcher.shards.reader import load_mel, read_samples

    rows = {}
    for line in (corpus / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split("\t")
        rows[Path(fields[1]).stem] = fields[1]
    stored = [(json.loads(s.meta)["id"], load_mel(s.mel)) for shard in load_index(shards).shards("test")
              for s in read_samples(shard.path)][:clips]
    gap, diffs, joins, windows, at_joins, frames, differing = 20, [], 0, 0, [], 0, 0
    i = 0
    while i < len(stored):
        ids, mels, offsets, end = [], [], [], 0
        while i < len(stored) and (not mels or end + gap + stored[i][1].shape[-1] <= N_FRAMES):
            offsets.append(end + gap if mels else 0)
            ids.append(stored[i][0])
            mels.append(stored[i][1].astype(np.float32))
            end = offsets[-1] + mels[-1].shape[-1]
            i += 1
        waves = [decode_audio((corpus / "clips" / rows[cid]).read_bytes()) for cid in ids]
        audio = np.zeros(offsets[-1] * HOP_LENGTH + len(waves[-1]), dtype=np.float32)
        for w, o in zip(waves, offsets, strict=True):
            audio[o * HOP_LENGTH: o * HOP_LENGTH + len(w)] = w
        reference, joined = log_mel_spectrogram(audio), join_features(mels, offsets)
        diff = np.abs(joined - reference)
        near = np.zeros(diff.shape[-1], dtype=bool)
        for o in offsets[1:]:
            near[max(0, o - 2): o + 3] = True
        diffs.append(diff[:, ~near].max())
        frames += diff.shape[-1]
        differing += int((diff.max(axis=0) > 0.01).sum())
        at_joins.append(diff[:, near].max() if near.any() else 0.0)
        joins += len(offsets) - 1
        windows += 1
    return {"windows": windows, "joins": joins, "clips": len(stored),
            "max_abs_diff_away_from_joins": float(max(diffs)),
            "max_abs_diff_within_2_frames_of_a_join": float(max(at_joins)),
            "frames": frames, "frames_differing_over_0.01": differing,
            "note": "log-mel units after Whisper's (x + 4) / 4 scaling (a clip spans about 3 of them); stored "
                    "features are float16, so ~1e-3 away from joins is their rounding"}



# ---- the results file: runs merged by key, arms recomputed over their runs ----

def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    out = {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
           "values": values}
    out["half_range"] = (out["max"] - out["min"]) / 2
    if len(values) > 1:
        out["sd"] = statistics.stdev(values)
    return out


def aggregate(runs: dict) -> dict:
    """Per arm and budget ("<arm>-n<steps>"): mean and spread over its seeds."""
    arms: dict[str, dict] = {}
    for _, r in sorted(runs.items(), key=lambda kv: (kv[1]["training"]["steps"], kv[0])):
        arms.setdefault(f"{r['training']['arm']}-n{r['training']['steps']}", []).append(r)
    out = {}
    for key, rs in arms.items():
        s, lf, t = [r["short_form"] for r in rs], [r["long_form"] for r in rs], [r["training"] for r in rs]
        arm = t[0]["arm"]
        out[key] = {"arm": arm, "steps": t[0]["steps"], "seeds": [x["seed"] for x in t],
                    "tests": ARMS[arm][1] if arm in ARMS else None,
                    "short_form_wer": spread([x["wer"] for x in s]),
                    "runaway_clips": spread([x["runaway_clips"] for x in s]),
                    "wer_without_runaways": spread([x["wer_without_runaways"] for x in s]),
                    "clips_continued": spread([x.get("clips_continued") for x in s]),
                    "long_form_wer": spread([x.get("wer") for x in lf]),
                    "long_form_runaways": spread([x.get("runaway_clips") for x in lf]),
                    "timestamps_inside": spread([x.get("timestamps_inside") for x in lf]),
                    "last_end_minus_audio_s_mean": spread([x.get("last_end_minus_audio_s_mean") for x in lf]),
                    "seconds_per_step": spread([x["seconds_per_step"] for x in t]),
                    "audio_s_per_s": spread([x["audio_s_per_s"] for x in t]),
                    "samples_per_step": spread([x["samples_per_s"] * x["seconds_per_step"] for x in t]),
                    "final_loss": spread([x["final_loss"] for x in t])}
    return out


def table(result: dict) -> str:
    def f(d: dict, digits: int = 1, pct: bool = False) -> str:
        if not d:
            return "-"
        scale = 100 if pct else 1
        text = f"{d['mean'] * scale:.{digits}f}"
        return text + (f" +- {d['half_range'] * scale:.{digits}f}" if d.get("n", 1) > 1 else "")

    lines = ["| arm | seeds | short-form WER (mean +- half range) | runaway clips | WER without runaways | "
             "long-form WER | timestamps inside | s/step | clips/step |", "|---|---|---|---|---|---|---|---|---|"]
    zs = result.get("zero_shot")
    if zs:
        lines.append(f"| zero-shot | - | {zs['short_form']['wer']:.1f} | {zs['short_form']['runaway_clips']} | "
                     f"{zs['short_form']['wer_without_runaways']:.1f} | {zs['long_form'].get('wer', 0):.1f} | "
                     f"{zs['long_form'].get('timestamps_inside', 0):.0%} | - | - |")
    for arm, a in result.get("arms", {}).items():
        lines.append(f"| {arm} | {len(a['seeds'])} | {f(a['short_form_wer'], 2)} | {f(a['runaway_clips'])} | "
                     f"{f(a['wer_without_runaways'], 2)} | {f(a['long_form_wer'], 2)} | "
                     f"{f(a['timestamps_inside'], 0, pct=True)}% | {f(a['seconds_per_step'])} | "
                     f"{f(a['samples_per_step'])} |")
    return "\n".join(lines)


def machine() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="unpacked,packed", help="comma-separated arm names (--list)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated recipe seeds (data order, label draws)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (8 windows of 30 s each)")
    ap.add_argument("--test-clips", type=int, default=400, help="first N clips of the test split")
    ap.add_argument("--clips", type=int, default=3300, help="corpus size (1/8 of the clips land in test)")
    ap.add_argument("--long-form", type=float, default=30.0, help="long-form recording length; 0: none")
    ap.add_argument("--curve-arms", default="unpacked", help="arms whose first seed's run records a validation "
                    "learning curve during training")
    ap.add_argument("--curve-every", type=int, default=20)
    ap.add_argument("--curve-samples", type=int, default=96, help="validation clips per curve point")
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--eot-clips", type=int, default=160, help="test clips of the teacher-forced end-of-text "
                    "measurement (0: none)")
    ap.add_argument("--feature-join", action="store_true", help="also measure joined stored features against the "
                    "joined audio's log-mel on consecutive test clips (a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true", help="list the arms and exit")
    ap.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    if args.list:
        for name, (overrides, tests) in ARMS.items():
            print(f"{name:28} {tests}\n{'':28} {' '.join(overrides)}")
        return
    if args.report:
        print(table(json.loads(args.out.read_text())))
        return
    args.arms = [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.curve_arms = [a for a in args.curve_arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")

    started = time.perf_counter()
    model, corpus = assets.whisper_base(), assets.synthetic_corpus(LANG, args.clips)
    shards = realruns.corpus_shards(corpus, LANG)
    index = json.loads((shards / "index.json").read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    setting = {"corpus_clips": args.clips, "test_clips": args.test_clips, "long_form_s": args.long_form}
    result = read_json(args.out) or {}
    if result.get("setting") != setting:  # another measurement (an earlier issue's): start afresh
        result = {}
    result.update({"benchmark": "packing", "setting": setting, "machine": machine(),
                   "corpus": {s: {"clips": v["samples"], "seconds": v["seconds"]} for s, v in index["splits"].items()},
                   "recipe": str(RECIPE.relative_to(REPO)), "common_overrides": list(realruns.COMMON),
                   "arm_definitions": {k: {"overrides": v[0], "tests": v[1]} for k, v in ARMS.items()},
                   "budget": "equal optimizer steps per run: each step is 8 windows of 30 s through the encoder"})
    result.setdefault("runs", {})
    result["updated"] = time.strftime("%Y-%m-%d %H:%M")

    def save() -> None:
        result["arms"] = aggregate(result["runs"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)

    for seed in args.seeds:  # seed-major: a cut-short invocation has every arm at its first seed
        for arm in args.arms:
            try:
                result["runs"][f"{arm}-s{seed}-n{args.steps}"] = run_one(model, shards, arm, seed, args)
            except RuntimeError as e:  # one failed run (it says why) does not stop the others
                print(f"FAILED {arm} seed {seed}: {str(e)[-2000:]}", flush=True)
                result.setdefault("failures", {})[f"{arm}-s{seed}-n{args.steps}"] = str(e)[-2000:]
            save()
    if not args.no_zero_shot and "zero_shot" not in result:
        zs = WORK / "zero-shot"
        zs.mkdir(exist_ok=True)
        result["zero_shot"] = {
            "short_form": evaluate(model, shards, zs / "eval-short", args.test_clips, None),
            "long_form": evaluate(model, shards, zs / "eval-long", args.test_clips, args.long_form)
            if args.long_form else {}}
        save()
    if args.eot_clips:
        models = {"zero-shot": WORK / "zero-shot" / "model"}
        models["zero-shot"].parent.mkdir(exist_ok=True)
        if not models["zero-shot"].exists():
            models["zero-shot"].symlink_to(model)
        models.update({key: WORK / key / "final" for key in result["runs"] if (WORK / key / "final").is_dir()})
        for key, eot in end_of_text(models, model, shards, args.eot_clips).items():
            if key == "zero-shot":
                result["zero_shot_end_of_text"] = eot
            else:
                result["runs"][key]["end_of_text"] = eot
        save()
    curve_zero = [a for a in args.arms if a in args.curve_arms]
    if curve_zero and "validation_curve_zero_shot" not in result:  # the curves' step 0
        r = evaluate(model, shards, WORK / "zero-shot" / "eval-validation", args.curve_samples, None,
                     split="validation")
        result["validation_curve_zero_shot"] = {"step": 0, **{k: r[k] for k in ("wer", "runaway_clips",
                                                                               "wer_without_runaways")}}
        save()
    if args.feature_join:
        result["feature_join"] = feature_join_difference(shards, corpus)
        save()
    result["seconds_this_invocation"] = time.perf_counter() - started
    save()
    print(table(result))
    print(f"saved {args.out} ({result['seconds_this_invocation']:.0f} s)")


if __name__ == "__main__":
    main()
