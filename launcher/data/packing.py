"""Packing: consecutive training clips joined into windows of up to 30 s (`data.pack`).

Whisper's encoder always reads a 30 s window; a 5 s Common Voice clip alone leaves five sixths of it padding.
A window holds clips at frame offsets (10 ms frames), a gap of silence between them, and is closed before the next
clip would pass `max_seconds` or its labels would pass the decoder's 448 tokens (`LabelEncoder.fits`). With
`same_speaker`, a clip joins only the open window of its own speaker (the shards' `speaker`, e.g. Common Voice's
client_id); a clip without one is never joined to another. Clips of different languages (shard sets) are never
joined: a window's labels start with one language token.

Features are joined from the stored ones when the window is loaded (`features.join_features`), which gives the
joined audio's log-mel except at the frames spanning a join: bench/packing.py measures the difference.

With `single_probability` p, each window the packer opens is, with probability p, closed at once around its first
clip: a share p of the windows hold one clip followed by silence, which is how short-form evaluation (and the event's
test) presents every clip. It was built for the fear that a model trained only on full windows keeps talking after
a short clip ends; bench/packing.py did not find that (P(end of text) after a short clip's text: 0.976 packed, 0.997
unpacked; timestamps inside the audio in 97% of recordings packed), so it defaults to 0. The draw is seeded by the
run's seed and the clip's epoch and position, so it is the same whatever the ranks, workers and resumes.

Windows are built from a loader worker's stream of clips in its order, so every clip is in exactly one window per
epoch, and they never span epochs (the stream closes every open window at an epoch's end; with `same_speaker` also
at the end of each shuffle block, which bounds what is held to one block's clips).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from launcher.features import HOP_LENGTH, SAMPLE_RATE

FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # 0.01 s


@dataclass(frozen=True)
class PackSettings:
    max_frames: int  # the window's length in frames: max_seconds / 10 ms
    gap_frames: int  # silence between two clips
    same_speaker: bool
    single_probability: float = 0.0  # share of windows that hold one clip (see the module's docstring)

    @classmethod
    def from_seconds(cls, max_seconds: float, gap_seconds: float, same_speaker: bool,
                     single_probability: float = 0.0) -> PackSettings:
        return cls(int(round(max_seconds / FRAME_SECONDS)), int(round(gap_seconds / FRAME_SECONDS)), same_speaker,
                   single_probability)


@dataclass
class ClipRef:
    """One usable training clip as a worker's stream holds it before its window is loaded."""

    id: str
    epoch: int
    position: int  # in the epoch's sequence (`data.TrainedPositions` records it)
    text_ids: tuple[int, ...]
    seconds: float
    mel: bytes  # the stored .npy, loaded only for the windows that are trained on
    frames: int = 0  # of the stored features, from the .npy header
    speaker: str | None = None
    language: str | None = None  # of its shard set: a window holds one language


@dataclass
class Window:
    clips: list[ClipRef] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # frame of each clip's start

    @property
    def end(self) -> int:
        return self.offsets[-1] + self.clips[-1].frames if self.clips else 0

    def starts(self) -> list[float]:
        return [o * FRAME_SECONDS for o in self.offsets]


class Packer:
    """Clips in, windows out, in stream order of their closing. `fits(text lengths)` says whether a window's
    labels fit the decoder. Without settings (packing off) every clip is a window of its own. `seed`: the run's,
    for the single-clip windows' draws."""

    def __init__(self, settings: PackSettings | None, fits: Callable[[list[int]], bool], seed: int = 0):
        self.settings, self.fits, self.seed = settings, fits, seed
        self.open: dict[str, Window] = {}  # one per speaker (one in all without same_speaker)

    def _single(self, clip: ClipRef) -> bool:
        """Whether the window `clip` opens holds it alone: drawn from the seed and the clip's place in the plan."""
        p = self.settings.single_probability
        return p > 0 and random.Random(f"{self.seed}:single:{clip.epoch}:{clip.position}").random() < p

    def _key(self, clip: ClipRef) -> str:
        """The open window a clip may join: one per language, and per speaker with same_speaker."""
        if not self.settings.same_speaker:
            return str(clip.language)
        return f"{clip.language}:speaker:{clip.speaker}" if clip.speaker else f"clip:{clip.id}"

    def _room(self, window: Window, clip: ClipRef) -> int | None:
        """The offset `clip` would take in `window`, or None if it does not fit there."""
        offset = window.end + self.settings.gap_frames if window.clips else 0
        if window.clips and offset + clip.frames > self.settings.max_frames:
            return None
        if window.clips and not self.fits([len(c.text_ids) for c in window.clips] + [len(clip.text_ids)]):
            return None
        return offset

    def add(self, clip: ClipRef) -> Iterator[Window]:
        if self.settings is None:
            yield Window([clip], [0])
            return
        key = self._key(clip)
        window = self.open.get(key)
        offset = self._room(window, clip) if window else 0
        if offset is None:
            yield self.open.pop(key)
            window, offset = None, 0
        if window is None:
            if self._single(clip):
                yield Window([clip], [0])
                return
            window = self.open[key] = Window()
        window.clips.append(clip)
        window.offsets.append(offset)

    def flush(self) -> Iterator[Window]:
        """Close every open window, oldest first."""
        windows, self.open = list(self.open.values()), {}
        yield from windows
