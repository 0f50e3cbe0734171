"""Evaluation inside training: validation WER every `eval.every_steps`, the best checkpoints by WER, and at the
end the delivered model: the best by WER (else the last weights), exported to final/, scored on test, carded.
With `eval.long_form_seconds`, each of those evaluations is also scored long-form (`launcher.longform`), logged as
wer_long beside the clip WER; the best checkpoint is still the one with the best clip WER."""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint import LoopState, export_hf, load_weights, tag
from launcher.evaluate import EvalItem, clips_on_rank, evaluate, scan_split
from launcher.model import DecodeSettings
from launcher.recipe import Recipe, recipe_yaml
from launcher.shards import ShardIndex


class PeriodicEval:
    def __init__(self, recipe: Recipe, index: ShardIndex, engine, processor, device, dtype, logger, watchdog):
        self.recipe, self.index, self.engine, self.processor = recipe, index, engine, processor
        self.device, self.dtype, self.logger, self.watchdog = device, dtype, logger, watchdog
        self.run_dir = Path(recipe.output_dir)
        e = recipe.eval
        self.settings = DecodeSettings(language=recipe.model.language, task=recipe.model.task,
                                       batch_size=e.batch_size_per_gpu, num_beams=e.num_beams,
                                       max_new_tokens=e.max_new_tokens)
        self.recipe_text = recipe_yaml(recipe)
        self._items: dict[str, list[EvalItem]] = {}  # each split's tar headers are read once per run

    def due(self, step: int) -> bool:
        every = self.recipe.eval.every_steps
        return bool(every) and (step % every == 0 or step == self.recipe.optim.max_steps)

    def items(self, split: str, max_samples: int | None) -> list[EvalItem]:
        if split not in self._items:
            self._items[split] = scan_split(self.index, split, max_samples)
        return self._items[split]

    def _evaluate(self, split: str, step: int, max_samples: int | None, long_form: float | None = None) -> dict:
        """Every rank gets rank 0's report, so that every rank takes the same decisions from it."""
        import torch.distributed as dist

        items = self.items(split, max_samples)
        mine = clips_on_rank(items, dist.get_world_size(), dist.get_rank(), long_form)
        label = f"eval {split}" + (f" long-form {long_form:g} s" if long_form else "")
        with self.logger.progress_task(label, mine) as advance:
            def progress(n: int) -> None:
                self.watchdog.beat()
                advance(n)

            self.watchdog.beat()
            report = evaluate(self.engine.module, self.processor.tokenizer, items, self.settings, split=split,
                              device=self.device, dtype=self.dtype, out_dir=self.run_dir / "eval", step=step,
                              model_name=str(self.run_dir), recipe_text=self.recipe_text, progress=progress,
                              long_form=long_form)
        shared = [report]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def _long_form(self, split: str, step: int, max_samples: int | None) -> dict:
        seconds = self.recipe.eval.long_form_seconds
        r = self._evaluate(split, step, max_samples, long_form=seconds)
        self.logger.print(f"step {step}: {split} long-form ({seconds:g} s recordings) WER {r['wer']:.2f}% on "
                          f"{r['recordings']} recordings; timestamps in order {100 * r['timestamps_monotone']:.0f}%, "
                          f"inside the audio {100 * r['timestamps_inside']:.0f}%")
        return r

    def run(self, step: int, loop: LoopState) -> None:
        """Evaluate every eval split at `step`; the best-by-WER record in `loop` follows the first split."""
        e = self.recipe.eval
        reports = []
        for split in e.splits:
            r = self._evaluate(split, step, e.max_samples)
            scalars = {k: r[k] for k in ("wer", "wer_orthographic", "cer")}
            self.logger.print(f"step {step}: {split} WER {r['wer']:.2f}% (orthographic "
                              f"{r['wer_orthographic']:.2f}%, CER {r['cer']:.2f}%) on {r['scored']} clips")
            if e.long_form_seconds:
                scalars["wer_long"] = self._long_form(split, step, e.max_samples)["wer"]
            self.logger.scalars(f"eval/{split}", step, scalars)
            reports.append(r)
        if loop.record_wer(reports[0]["wer"], step, self.recipe.checkpoint.keep_best):
            self.watchdog.beat()
            export_hf(self.engine, self.run_dir / "best", self.processor, self.settings)

    def deliver(self, loop: LoopState) -> None:
        """The end of a finished run: load the best checkpoint (by validation WER) or keep the last weights, export
        them to final/, score them on test and write the model card."""
        from launcher.card import write_model_card

        selected, step = f"last step ({loop.step})", loop.step
        if loop.best:
            wer, step = loop.best[0]
            self.watchdog.beat()
            load_weights(self.engine, self.run_dir / "checkpoints", tag(step))
            selected = f"{tag(step)}, best {self.recipe.eval.splits[0]} WER {wer:.2f}%"
        final = self.run_dir / "final"
        self.watchdog.beat()
        export_hf(self.engine, final, self.processor, self.settings)
        test = None
        if self.index.has_split("test") and self.recipe.eval.test_at_end:
            test = self._evaluate("test", step, None)
            if self.recipe.eval.long_form_seconds:
                self._long_form("test", step, None)
        if self.logger.enabled:
            if test is not None:
                write_model_card(final, name=self.run_dir.name, base_model=self.recipe.model.name_or_path,
                                 language=self.recipe.model.language, source=self.index.source, report=test,
                                 steps=loop.step, selected=selected)
                self.logger.print(f"test WER {test['wer']:.2f}% (orthographic {test['wer_orthographic']:.2f}%, "
                                  f"CER {test['cer']:.2f}%) of {selected}")
            self.logger.print(f"done: {loop.step} steps. Model: {final}  log: {self.run_dir / 'train_log.jsonl'}")
