"""One optimizer step, and what the loop sums over a logging window.

A step waits for nothing: losses stay on the device, and a step whose gradients are not finite is skipped by
DeepSpeed itself (its global gradient norm is the same on every rank). The ranks talk only at sync steps (logging
steps, at most SYNC_EVERY apart), where one all-reduce carries the window's numbers and any stop request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from launcher.features import N_FRAMES

SYNC_EVERY = 10  # steps between the ranks' agreements on a stop request, when logging is rarer


@dataclass
class StepResult:
    batches: list[dict]  # the micro-batches of the step, on the host
    losses: list = field(default_factory=list)  # their loss tensors, on the device


def train_step(engine, batches, grad_accum: int, device, dtype, window: int = N_FRAMES) -> StepResult:
    """One optimizer step: `grad_accum` micro-batches forward and backward, then DeepSpeed's step. Features are
    padded to the model's input window (`window` frames, `model.input_frames`) on the device. Waits for nothing: a
    non-finite loss gives non-finite gradients, and DeepSpeed skips a step whose global gradient norm is not finite
    on every rank alike (`engine.was_step_applied()`)."""
    from launcher.features import pad_batch

    result = StepResult([])
    for _ in range(grad_accum):
        batch = next(batches)
        stored, frames, pads = (batch[k].to(device, non_blocking=True) for k in ("features", "frames", "pads"))
        features = pad_batch(stored, frames, pads, dtype, window=window)
        labels = batch["labels"].to(device, non_blocking=True)
        inputs = batch.get("decoder_input_ids")  # with prompts; else the model shifts the labels itself
        if inputs is not None:
            inputs = inputs.to(device, non_blocking=True)
        loss = engine(input_features=features, labels=labels, decoder_input_ids=inputs).loss
        engine.backward(loss)
        engine.step()
        result.batches.append(batch)
        result.losses.append(loss.detach().float())
    return result


@dataclass(frozen=True)
class WindowTotals:
    """A logging window's numbers summed over every rank (`LogWindow.reduce`)."""

    loss: float  # mean finite micro-batch loss
    samples: float
    tokens: float
    dropped: int
    bad: int
    audio: float
    stop: bool  # some rank was asked to stop


class LogWindow:
    """What the loop sums between two sync steps, on this rank; losses stay on the device."""

    def __init__(self, device, epoch: int = 0):
        import torch

        self.device = device
        self.loss = torch.zeros((), device=device)  # sum of finite micro-batch losses
        self.finite = torch.zeros((), device=device)  # how many micro-batch losses were finite
        self.samples = self.tokens = self.dropped = self.bad = self.skipped = 0
        self.audio = 0.0  # seconds of the clips' audio
        self.seconds = 0.0  # time in training steps (data wait included; evaluation and saving not)
        self.epoch = epoch  # the latest epoch any batch of the run came from: carried from window to window
        self._started = 0.0

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def end_step(self) -> None:
        self.seconds += time.perf_counter() - self._started

    def add(self, result: StepResult) -> None:
        import torch

        for batch, loss in zip(result.batches, result.losses, strict=True):
            finite = torch.isfinite(loss)
            self.loss += torch.where(finite, loss, 0.0)
            self.finite += finite
            self.samples += len(batch["ids"])  # clips: a packed window counts each of its clips
            self.tokens += batch["tokens"]
            self.audio += batch["seconds"]
            self.dropped += batch["dropped_long"]
            self.bad += batch["bad_data"]
            self.epoch = max(self.epoch, batch["epoch"])

    def reduce(self, stop_requested: bool) -> WindowTotals:
        """Collective: the one all-reduce the loop adds, at a sync step only."""
        import torch
        import torch.distributed as dist

        counts = [self.samples, self.tokens, self.dropped, self.bad, self.audio, float(stop_requested)]
        stats = torch.cat([torch.stack([self.loss, self.finite]).double(),
                           torch.tensor(counts, dtype=torch.float64).to(self.device)])
        dist.all_reduce(stats)
        loss, finite, samples, tokens, dropped, bad, audio, stop = stats.tolist()  # one read back to the host
        return WindowTotals(loss=loss / max(finite, 1.0), samples=samples, tokens=tokens, dropped=int(dropped),
                            bad=int(bad), audio=audio, stop=stop > 0)

    def record(self, totals: WindowTotals, *, step: int, lr: float, grad_norm: float) -> dict:
        """The train_log.jsonl line of a logging step: rates over the window's wall time."""
        return {"step": step, "loss": totals.loss, "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": totals.samples / self.seconds, "tokens_per_s": totals.tokens / self.seconds,
                "audio_s_per_s": totals.audio / self.seconds, "epoch": self.epoch,
                "dropped_long_labels": totals.dropped, "skipped_bad_samples": totals.bad,
                "skipped_nonfinite_steps": self.skipped, "window_s": self.seconds, "time": time.time()}
