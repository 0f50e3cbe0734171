"""Long-form evaluation: the split's clips joined into recordings of about N seconds, decoded window after window.

Common Voice clips are a few seconds each; a model fine-tuned on them can still lose words, repeat itself or
misplace timestamps on a recording longer than Whisper's 30 s window, which is how it is used. So evaluation can
join clips, one speaker's in index order (clips without a speaker form one group), with 0.5 s of silence between
them, into recordings that never exceed N seconds (a clip longer than N is a recording of its own). The features
are joined, not recomputed (`launcher.features.join_features`): the same as the joined audio's but for the frames
whose 25 ms window spans a join. The reference is the clips' texts joined by spaces. Scoring normalises it clip by
clip and the prediction segment by segment: Whisper's normaliser drops text between brackets, and over a join one
clip's "(" and a later clip's ")" would drop the clips between them (it happened on 1 of 39 German recordings).

Decoding is transformers' sequential long-form `generate` (as openai/whisper's `transcribe`): more than 3000
frames turns it on for the whole batch; it then needs timestamps (each window's last timestamp says where the next
window starts) and, for a batch, an attention mask over frames, whose sum is each recording's length (frames past
it are never read; a window that passes the end is padded with zeros, as openai/whisper pads it). A recording of
30 s or less is short-form: padded to 3000 frames with its floor value, as training pads clips, and decoded with
timestamps too. A batch that mixed both would turn its short recordings long-form, so the two are decoded apart and
a recording decodes the same whatever batch it falls in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from launcher.evaluation.items import EvalItem
from launcher.features import FRAMES_PER_SECOND, join_features, pad_batch, pad_value
from launcher.model import DecodeSettings, input_frames

GAP_SECONDS = 0.5  # silence between joined clips
TIMESTAMP_SLACK = 0.5  # seconds a segment may end past the recording and still count as inside it


def split_name(split: str, seconds: float) -> str:
    """The report's split name: test-long-30s."""
    return f"{split}-long-{seconds:g}s"


@dataclass(frozen=True)
class Recording:
    clips: tuple[EvalItem, ...]

    @property
    def id(self) -> str:
        """The first clip's id, and how many clips follow it: unique, as every clip is in one recording."""
        first = self.clips[0].id
        return first if len(self.clips) == 1 else f"{first}+{len(self.clips) - 1}"

    @property
    def text(self) -> str:
        return " ".join(c.text for c in self.clips)

    @property
    def starts(self) -> list[float]:
        """Where each clip's audio starts, in seconds."""
        out, t = [], 0.0
        for c in self.clips:
            out.append(t)
            t += c.seconds + GAP_SECONDS
        return out

    @property
    def seconds(self) -> float:
        return self.starts[-1] + self.clips[-1].seconds

    def features(self) -> np.ndarray:
        """Unpadded float32 log-mel of the recording. A clip's last frame reaches at most 200 samples past its
        audio, far short of the gap: clips never overlap."""
        offsets = [round(t * FRAMES_PER_SECOND) for t in self.starts]
        return join_features([c.mel.load() for c in self.clips], offsets)


def build_recordings(items: list[EvalItem], seconds: float) -> list[Recording]:
    """Each speaker's clips (in index order) joined into recordings of at most `seconds`; a recording closes before
    the next clip would take it past `seconds`. Every clip is in exactly one recording; recordings come in the order
    of their first clips."""
    if not seconds > 0:
        raise ValueError(f"long-form recordings need a positive length in seconds, got {seconds}")
    position = {it.id: i for i, it in enumerate(items)}
    open_: dict[str | None, list[EvalItem]] = {}
    done: list[list[EvalItem]] = []
    for it in items:
        clips = open_.get(it.speaker)
        if clips and Recording(tuple(clips)).seconds + GAP_SECONDS + it.seconds > seconds:
            done.append(clips)
            clips = None
        if not clips:
            clips = open_[it.speaker] = []
        clips.append(it)
    done += open_.values()
    return sorted((Recording(tuple(c)) for c in done), key=lambda r: position[r.clips[0].id])


def generation_config(settings: DecodeSettings, model):
    config = settings.generation_config(model)
    config.return_timestamps = True  # long-form needs them; short recordings ask too, so all decode alike
    config.force_unique_generate_call = False  # window after window: the seek loop is the point here
    config.condition_on_prev_tokens = False  # each window on its own: a wrong window does not steer the next
    # max_length stays the cap on new tokens per window, as in short-form (max_new_tokens beside the model's
    # max_length only warns at every window); transformers 5.24 adds the 3 prompt tokens to it at every window, so
    # window k may take 3 (k - 1) tokens more, never past the decoder's 448 positions
    return config


def timestamp_checks(segments: list[tuple[float, float]], seconds: float) -> dict:
    """Whether a recording's decoded segments are in order (starts never go back, no segment ends before it
    starts) and inside the audio (from 0 to its end, with `TIMESTAMP_SLACK`)."""
    starts = [start for start, _ in segments]
    monotone = all(end >= start for start, end in segments) and starts == sorted(starts)
    inside = all(0.0 <= start and end <= seconds + TIMESTAMP_SLACK for start, end in segments)
    return {"timestamps_monotone": monotone, "timestamps_inside": inside}


def _decode(model, tokenizer, config, mels: list[np.ndarray], device, dtype) -> tuple[list[str], list[list],
                                                                                       list[list[str]]]:
    """One `generate` call over recordings that are all short- or all long-form: texts, (start, end) segments and
    the segments' texts."""
    frames = torch.tensor([m.shape[-1] for m in mels])
    longest = int(frames.max())
    stored = torch.zeros(len(mels), mels[0].shape[0], longest)
    for i, m in enumerate(mels):
        stored[i, :, : m.shape[-1]] = torch.from_numpy(m)
    pads = torch.tensor([pad_value(float(m.max())) for m in mels])  # what silence after each recording gives
    window = max(input_frames(model.config), longest)
    features = pad_batch(stored.to(device), frames.to(device), pads.to(device), dtype, window=window)
    mask = (torch.arange(window)[None, :] < frames[:, None]).long().to(device)  # long-form: each one's length
    out = model.generate(input_features=features, attention_mask=mask, generation_config=config,
                         return_segments=True)
    texts = [t.strip() for t in tokenizer.batch_decode(out["sequences"], skip_special_tokens=True)]
    segments = [[(round(float(s["start"]), 2), round(float(s["end"]), 2)) for s in segs] for segs in out["segments"]]
    segment_texts = [_word_parts([tokenizer.decode(s["tokens"], skip_special_tokens=True) for s in segs])
                     for segs in out["segments"]]
    return texts, segments, segment_texts


def _word_parts(texts: list[str]) -> list[str]:
    """Segments' texts as parts that end at word boundaries: a segment that goes on with a word (no leading space)
    joins the part before it."""
    parts: list[str] = []
    for t in filter(None, texts):  # an empty segment adds nothing, nor a word boundary
        if parts and not t[0].isspace():
            parts[-1] += t
        else:
            parts.append(t)
    return [p.strip() for p in parts]


@torch.no_grad()
def transcribe_recordings(model, tokenizer, recordings: list[Recording], settings: DecodeSettings, device, dtype,
                          progress: Callable[[int], None] | None = None) -> list[dict]:
    """Decode `recordings` on a plain model, longest first; `progress` is told the clips each batch held."""
    config = generation_config(settings, model)
    order = sorted(recordings, key=lambda r: -r.seconds)
    out = []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        mels = [r.features() for r in batch]
        for long in (True, False):
            part = [i for i, m in enumerate(mels) if (m.shape[-1] > input_frames(model.config)) == long]
            if not part:
                continue
            texts, segments, segment_texts = _decode(model, tokenizer, config, [mels[i] for i in part], device,
                                                     dtype)
            for i, text, segs, seg_texts in zip(part, texts, segments, segment_texts, strict=True):
                r = batch[i]
                # `references` and `predictions`: the parts `evaluate.score` normalises one by one
                out.append({"id": r.id, "reference": r.text, "prediction": text, "seconds": round(r.seconds, 4),
                            "clips": [c.id for c in r.clips], "segments": segs,
                            "references": [c.text for c in r.clips], "predictions": seg_texts,
                            **timestamp_checks(segs, r.seconds)})
        if progress is not None:
            progress(sum(len(r.clips) for r in batch))
    return out


def report_fields(seconds: float, rows: list[dict]) -> dict:
    """What a long-form report adds: the recording length asked for, and the share of recordings whose timestamps
    are in order and inside the audio."""
    n = len(rows)
    return {"long_form_seconds": seconds, "recordings": n,
            "clips": sum(len(r["clips"]) for r in rows),
            "timestamps_monotone": sum(r["timestamps_monotone"] for r in rows) / n if n else 1.0,
            "timestamps_inside": sum(r["timestamps_inside"] for r in rows) / n if n else 1.0}
