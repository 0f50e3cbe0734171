"""Training labels: the token sequence the decoder learns for one clip or one packed window of clips.

Layouts (the model puts <|startoftranscript|> in front itself when it shifts labels into decoder inputs, as in the
event's data collator, so labels start after it):

    plain       <|lang|> <|task|> <|notimestamps|> text... <|endoftext|>
    timestamps  <|lang|> <|task|> <|t0|> text of clip 1 <|t1|> <|t2|> text of clip 2 <|t3|> ... <|endoftext|>

Each clip's text is tokenised with a leading space (Whisper's convention); in the plain layout the clips' tokens
follow each other, which is the texts joined by spaces. Timestamps are Whisper's tokens <|0.00|> .. <|30.00|>,
0.02 s apart, the nearest to the clip's start and end in the window. A prompt (the previous window's text, as
Whisper conditions on earlier text at inference) goes before the start token, `<|startofprev|> text...`, and is
not learned (its targets are -100): `data.collate` builds the decoder inputs for it.

Nothing is ever truncated: a clip whose labels do not fit the decoder's 448 positions is dropped (and counted), a
window closes before its labels would not fit, and only the prompt, which is context, keeps its last tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import LauncherError
from launcher.text import normalize_target

MAX_LABEL_TOKENS = 448  # Whisper's decoder has 448 positions
MAX_PROMPT_TOKENS = 223  # Whisper's limit on previous-text context: max_target_positions // 2 - 1
TIME_PRECISION = 0.02  # seconds between timestamp tokens
LAST_TIMESTAMP = 1500  # <|30.00|>


@dataclass(frozen=True)
class Segment:
    """One clip's text tokens and where it lies in its window, in seconds."""

    text_ids: tuple[int, ...]
    start: float
    end: float


class LabelEncoder:
    """Text -> label ids in the layouts above. `language`: the language token of labels that name none (a run's
    shard sets name their own, `window(language=)`). `timestamps`: whether labels may take the timestamp layout (one
    token longer per clip than plain), so length checks allow for it."""

    def __init__(self, tokenizer, language: str, task: str, normalize: bool, *, timestamps: bool = False,
                 vocab_size: int | None = None, max_tokens: int = MAX_LABEL_TOKENS):
        tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        self.task_tokens = tokenizer.prefix_tokens[1:3]  # [<|lang|>, <|task|>] after <|startoftranscript|>
        self._language_ids: dict[str, int] = {}
        self.start = tokenizer.prefix_tokens[0]
        self.no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
        self.previous = tokenizer.convert_tokens_to_ids("<|startofprev|>")
        # transformers finds the timestamps right after <|notimestamps|>, the last special token
        self.timestamp_begin = self.no_timestamps + 1
        # Whisper's ids after <|notimestamps|> are the 1501 timestamps, whether or not the tokenizer names them
        named = tokenizer.convert_tokens_to_ids("<|0.00|>")
        if timestamps and ((vocab_size is not None and vocab_size < self.timestamp_begin + LAST_TIMESTAMP + 1)
                           or named not in (self.timestamp_begin, tokenizer.unk_token_id, None)):
            raise LauncherError("data.timestamp_probability > 0, but the model has no timestamp tokens (Whisper's "
                                "1501 ids right after <|notimestamps|>)")
        self.eot = tokenizer.eos_token_id
        self.tokenizer, self.normalize, self.max_tokens = tokenizer, normalize, max_tokens
        self.timestamps = timestamps

    def text_ids(self, text: str) -> tuple[int, ...]:
        text = normalize_target(text) if self.normalize else text
        return tuple(self.tokenizer.encode(" " + text.strip(), add_special_tokens=False))

    def length(self, text_lengths: list[int]) -> int:
        """Label tokens of a window whose clips have these text lengths, in the longer layout it may take."""
        if self.timestamps:
            return len(self.task_tokens) + sum(n + 2 for n in text_lengths) + 1
        return len(self.task_tokens) + 1 + sum(text_lengths) + 1

    def fits(self, text_lengths: list[int]) -> bool:
        return self.length(text_lengths) + 1 <= self.max_tokens  # +1: the start token the model prepends

    def __call__(self, text: str) -> list[int] | None:
        """A lone clip's plain labels, or None when they would not fit the decoder (dropped, never truncated)."""
        ids = self.text_ids(text)
        return self.window([Segment(ids, 0.0, 0.0)], timestamps=False) if self.fits([len(ids)]) else None

    def timestamp(self, seconds: float) -> int:
        return self.timestamp_begin + min(LAST_TIMESTAMP, max(0, round(seconds / TIME_PRECISION)))

    def language_id(self, language: str) -> int:
        """The id of `<|language|>` (a Whisper code: `recipe.whisper_language_code`)."""
        if language not in self._language_ids:
            token = self.tokenizer.convert_tokens_to_ids(f"<|{language}|>")
            if token is None or token == self.tokenizer.unk_token_id:
                raise LauncherError(f"the tokenizer has no language token <|{language}|>")
            self._language_ids[language] = token
        return self._language_ids[language]

    def window(self, segments: list[Segment], *, timestamps: bool, language: str | None = None) -> list[int]:
        """Labels of a window of clips: its language's token (the encoder's default when None), the task, the
        texts in the plain or the timestamp layout."""
        head = [self.task_tokens[0] if language is None else self.language_id(language), self.task_tokens[1]]
        if not timestamps:
            return [*head, self.no_timestamps, *(t for s in segments for t in s.text_ids), self.eot]
        ids = list(head)
        for s in segments:
            ids += [self.timestamp(s.start), *s.text_ids, self.timestamp(s.end)]
        return [*ids, self.eot]

    def prompt(self, previous_text: tuple[int, ...], labels: int) -> list[int]:
        """`<|startofprev|>` and the end of the previous window's text, as much as fits before `labels` label
        tokens (and Whisper's 223); empty when nothing fits."""
        room = min(MAX_PROMPT_TOKENS, self.max_tokens - 1 - labels - 1)  # -1: the start token, -1: startofprev
        if room <= 0 or not previous_text:
            return []
        return [self.previous, *previous_text[-room:]]
