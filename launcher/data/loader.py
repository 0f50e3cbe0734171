"""Batches as they travel to the device (`collate`) and the DataLoader over a rank's stream (`train_loader`)."""

from __future__ import annotations

import signal
from functools import partial

import torch
from torch.utils.data import DataLoader

from launcher.data.labels import MAX_LABEL_TOKENS
from launcher.data.stream import ShardStream
from launcher.features import stack_features

LABEL_BUCKET = 32  # label lengths are padded to a multiple of this: few distinct shapes, kernels and allocations reused


def collate(samples: list[dict], start_token: int | None = None, pad_token: int | None = None,
            learn_language: bool = True) -> dict:
    """A batch as it travels to the device: the stored float16 frames (`stack_features`; `features.pad_batch` makes
    Whisper's 30 s window on the device), labels padded with -100 (ignored by the loss) to a multiple of
    LABEL_BUCKET tokens, and what the loop records about the samples (`ids` of every clip, `windows`: the clips of
    each sample).

    With prompts (`labels.LabelEncoder.prompt`), or with `learn_language` false (`model.train_language_token`: the
    language token is read by the decoder but its target is -100), the batch also carries the decoder inputs, which
    the model would otherwise make from the labels: [prompt..., start, labels[:-1]], the prompt's targets -100.
    `start_token` and `pad_token` are needed then (`train_loader` gives them)."""
    explicit = not learn_language or any(s["prompt"] for s in samples)
    lengths = [len(s["prompt"]) + len(s["labels"]) for s in samples]
    width = min(-(-max(lengths) // LABEL_BUCKET) * LABEL_BUCKET, MAX_LABEL_TOKENS)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        labels[i, len(s["prompt"]): lengths[i]] = torch.tensor(s["labels"])
    batch = {}
    if explicit:
        if start_token is None or pad_token is None:
            raise ValueError("a batch with prompts or an unlearned language token needs start_token and pad_token")
        inputs = torch.full((len(samples), width), pad_token, dtype=torch.long)
        for i, s in enumerate(samples):  # what the model reads at each position: the sequence shifted right
            inputs[i, : lengths[i]] = torch.tensor([*s["prompt"], start_token, *s["labels"][:-1]])
            if not learn_language:
                labels[i, len(s["prompt"])] = -100  # labels start with the language token
        batch["decoder_input_ids"] = inputs
    features, frames, pads = stack_features([s["features"] for s in samples])
    return {**batch, "features": features, "frames": frames, "pads": pads, "labels": labels,
            "tokens": sum(len(s["labels"]) for s in samples), "ids": [i for s in samples for i in s["ids"]],
            "windows": [s["ids"] for s in samples], "epochs": [s["epoch"] for s in samples for _ in s["ids"]],
            "positions": [p for s in samples for p in s["positions"]], "worker": samples[0]["worker"],
            "seconds": sum(s["seconds"] for s in samples),
            "epoch": max(s["epoch"] for s in samples), "dropped_long": sum(s["dropped_long"] for s in samples),
            "bad_data": sum(s["bad_data"] for s in samples)}


def _worker_ignores_stop_signals(_: int) -> None:
    """SIGTERM/SIGINT are for the rank's main process (it saves and leaves); a worker that died on them would
    break the batches the last step still needs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 learn_language: bool = True) -> DataLoader:
    batch = partial(collate, start_token=stream.labels.start, pad_token=stream.labels.eot,
                    learn_language=learn_language)
    return DataLoader(stream, batch_size=stream.batch_size, collate_fn=batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=_worker_ignores_stop_signals if num_workers else None)
