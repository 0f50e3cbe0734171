"""Short-form decoding: clips padded to the model's window, batched longest first, greedy as the event scored."""

from __future__ import annotations

from collections.abc import Callable

import torch

from launcher.evaluation.items import EvalItem
from launcher.features import pad_batch, stack_features
from launcher.model import DecodeSettings, input_frames

Progress = Callable[[int], None]  # called with the number of clips just decoded


@torch.no_grad()
def transcribe(model, tokenizer, items: list[EvalItem], settings: DecodeSettings, device, dtype,
               progress: Progress | None = None) -> list[dict]:
    """Decode `items` on a plain model (no DeepSpeed hooks: nothing here talks to other ranks), longest first so
    batches pad little. Features are padded to the model's input window on the device."""
    order = sorted(items, key=lambda it: -it.seconds)
    config = settings.generation_config(model)
    window = input_frames(model.config)
    out = []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        stored, frames, pads = (t.to(device) for t in stack_features([it.mel.load() for it in batch], window))
        features = pad_batch(stored, frames, pads, dtype, window=window)
        # Whisper reads the whole 30 s window, padding included, as in training: the mask is all ones and only
        # tells `generate` so (its encoder ignores it)
        mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device)
        tokens = model.generate(input_features=features, attention_mask=mask, generation_config=config)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        out += [{"id": it.id, "reference": it.text, "prediction": text.strip(), "seconds": it.seconds}
                for it, text in zip(batch, texts, strict=True)]
        if progress is not None:
            progress(len(batch))
    return out
