"""Evaluation inside training: validation WER every `eval.every_steps`, the best checkpoints by WER, and at the
end the delivered model: the best by WER (else the last weights), exported to final/, scored on test, carded.
With `eval.long_form_seconds`, each of those evaluations is also scored long-form
(`launcher.evaluation.longform`), logged as wer_long beside the clip WER; the best checkpoint is still the one with
the best clip WER.

With several shard sets (languages), each evaluation scores every language's split with its own language token,
reports `<split>-<language>` and logs each language's WER and their mean; the best checkpoint is the one with the
best mean (or one language's WER: `eval.select_by`)."""

from __future__ import annotations

from launcher.data.mixing import LanguageSet
from launcher.evaluation.items import EvalItem, scan_split
from launcher.evaluation.reports import split_label, write_mean_report
from launcher.evaluation.run import clips_on_rank, evaluate
from launcher.evaluation.scoring import mean_wer
from launcher.model import DecodeSettings
from launcher.recipe.checks import whisper_language_code
from launcher.recipe.load import recipe_yaml
from launcher.recipe.schema import Recipe
from launcher.run_folder import RunFolder, tag
from launcher.training.checkpoint import LoopState, export_hf, load_weights


class PeriodicEval:
    def __init__(self, recipe: Recipe, sets: list[LanguageSet], engine, processor, device, dtype, logger, watchdog):
        self.recipe, self.sets, self.engine, self.processor = recipe, sets, engine, processor
        self.device, self.dtype, self.logger, self.watchdog = device, dtype, logger, watchdog
        self.folder = RunFolder(recipe.output_dir)
        self.several = len(sets) > 1
        e = recipe.eval
        self.settings = {s.language: DecodeSettings(language=s.language, task=recipe.model.task,
                                                    batch_size=e.batch_size_per_gpu, num_beams=e.num_beams,
                                                    max_new_tokens=e.max_new_tokens) for s in sets}
        # the exported model: one language forced, or (several) Whisper's own detection picks it
        self.export_settings = DecodeSettings(language=None if self.several else sets[0].language,
                                              task=recipe.model.task, batch_size=e.batch_size_per_gpu,
                                              num_beams=e.num_beams, max_new_tokens=e.max_new_tokens)
        self.select_by = "mean" if not self.several or e.select_by == "mean" else whisper_language_code(e.select_by)
        self.recipe_text = recipe_yaml(recipe)
        self._items: dict[tuple[str, str], list[EvalItem]] = {}  # each split's tar headers are read once per run

    def due(self, step: int) -> bool:
        every = self.recipe.eval.every_steps
        return bool(every) and (step % every == 0 or step == self.recipe.optim.max_steps)

    def items(self, s: LanguageSet, split: str, max_samples: int | None) -> list[EvalItem]:
        if (s.language, split) not in self._items:
            self._items[(s.language, split)] = scan_split(s.index, split, max_samples)
        return self._items[(s.language, split)]

    def _evaluate(self, s: LanguageSet, split: str, step: int, max_samples: int | None,
                  long_form: float | None = None) -> dict:
        """Every rank gets rank 0's report, so that every rank takes the same decisions from it."""
        import torch.distributed as dist

        items = self.items(s, split, max_samples)
        mine = clips_on_rank(items, dist.get_world_size(), dist.get_rank(), long_form)
        name = split_label(split, s.language, self.several)
        label = f"eval {name}" + (f" long-form {long_form:g} s" if long_form else "")
        with self.logger.progress_task(label, mine) as advance:
            def progress(n: int) -> None:
                self.watchdog.beat()
                advance(n)

            self.watchdog.beat()
            report = evaluate(self.engine.module, self.processor.tokenizer, items, self.settings[s.language],
                              split=name, device=self.device, dtype=self.dtype, out_dir=self.folder.eval,
                              step=step, model_name=str(self.folder.root), recipe_text=self.recipe_text,
                              progress=progress, long_form=long_form)
        shared = [report]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def _long_form(self, s: LanguageSet, split: str, step: int, max_samples: int | None) -> dict:
        seconds = self.recipe.eval.long_form_seconds
        r = self._evaluate(s, split, step, max_samples, long_form=seconds)
        name = split_label(split, s.language, self.several)
        self.logger.print(f"step {step}: {name} long-form ({seconds:g} s recordings) WER {r['wer']:.2f}% on "
                          f"{r['recordings']} recordings; timestamps in order {100 * r['timestamps_monotone']:.0f}%, "
                          f"inside the audio {100 * r['timestamps_inside']:.0f}%")
        return r

    def _score_split(self, split: str, step: int, max_samples: int | None, long_form: bool) -> dict[str, dict]:
        """Every language's report on `split` ({language: report}), printed and logged, with their mean."""
        reports = {}
        for s in self.sets:
            r = self._evaluate(s, split, step, max_samples)
            name = split_label(split, s.language, self.several)
            self.logger.print(f"step {step}: {name} WER {r['wer']:.2f}% (orthographic {r['wer_orthographic']:.2f}%, "
                              f"CER {r['cer']:.2f}%) on {r['scored']} clips")
            scalars = {k: r[k] for k in ("wer", "wer_orthographic", "cer")}
            if long_form:
                scalars["wer_long"] = self._long_form(s, split, step, max_samples)["wer"]
            self.logger.scalars(f"eval/{name}", step, scalars)
            reports[s.language] = r
        if self.several:
            mean = mean_wer(reports)
            self.logger.print(f"step {step}: {split} mean WER {mean:.2f}% over {', '.join(reports)}")
            self.logger.scalars(f"eval/{split}", step, {"wer_mean": mean})
            if self.logger.enabled:
                write_mean_report(self.folder.eval, split, step, reports)
        return reports

    def selection_wer(self, reports: dict[str, dict]) -> float:
        return mean_wer(reports) if self.select_by == "mean" else reports[self.select_by]["wer"]

    def run(self, step: int, loop: LoopState) -> None:
        """Evaluate every eval split at `step`; the best-by-WER record in `loop` follows the first split."""
        e = self.recipe.eval
        first = None
        for split in e.splits:
            reports = self._score_split(split, step, e.max_samples, bool(e.long_form_seconds))
            first = first or reports
        if loop.record_wer(self.selection_wer(first), step, self.recipe.checkpoint.keep_best):
            self.watchdog.beat()
            export_hf(self.engine, self.folder.best, self.processor, self.export_settings)

    def deliver(self, loop: LoopState) -> None:
        """The end of a finished run: load the best checkpoint (by validation WER) or keep the last weights, export
        them to final/, score them on test and write the model card."""
        from launcher.card import write_model_card

        selected, step = f"last step ({loop.step})", loop.step
        if loop.best:
            wer, step = loop.best[0]
            self.watchdog.beat()
            load_weights(self.engine, self.folder.checkpoints, tag(step))
            which = f"{self.select_by} " if self.several else ""
            selected = f"{tag(step)}, best {self.recipe.eval.splits[0]} {which}WER {wer:.2f}%"
        final = self.folder.final
        self.watchdog.beat()
        export_hf(self.engine, final, self.processor, self.export_settings)
        tests = {}
        if self.recipe.eval.test_at_end and all(s.index.has_split("test") for s in self.sets):
            for s in self.sets:
                tests[s.language] = self._evaluate(s, "test", step, None)
                if self.recipe.eval.long_form_seconds:
                    self._long_form(s, "test", step, None)
        if self.logger.enabled:
            if tests:
                write_model_card(final, name=self.folder.name, base_model=self.recipe.model.name_or_path,
                                 sets=self.sets, reports=tests, steps=loop.step, selected=selected,
                                 recipe_text=self.recipe_text)
                for language, test in tests.items():
                    self.logger.print(f"{split_label('test', language, self.several)} WER {test['wer']:.2f}% "
                                      f"(orthographic {test['wer_orthographic']:.2f}%, CER {test['cer']:.2f}%) of "
                                      f"{selected}")
                if self.several:
                    self.logger.print(f"test mean WER {mean_wer(tests):.2f}% over {', '.join(tests)}")
                    write_mean_report(self.folder.eval, "test", step, tests)
            self.logger.print(f"done: {loop.step} steps. Model: {final}  log: {self.folder.train_log}")

