"""The training loop as a trainer: named set-up steps, then a loop of one screen that hands each step to its
collaborators (`step.train_step`, `step.LogWindow`, `periodic.PeriodicEval`, `checkpoint.save_checkpoint`).

Everything that can be wrong with a recipe is checked before the process group starts (`launcher.train.main`).
Then every rank builds the same model, streams its own part of the shards (`launcher.data`) and runs exactly
`optim.max_steps` optimizer steps, so no rank waits forever for another. Per step the loop adds nothing that waits for
the device or for other ranks; the ranks talk only at sync steps (`step.SYNC_EVERY`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from launcher.distributed import Peers, Watchdog, init_distributed, on_gpu, process_group_minutes
from launcher.errors import LauncherError
from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.load import recipe_yaml
from launcher.recipe.schema import Recipe
from launcher.run_folder import RunFolder
from launcher.training.checkpoint import (
    LoopState,
    find_resume_point,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_universal,
)
from launcher.training.step import SYNC_EVERY, LogWindow, StepResult, train_step
from launcher.training.stopping import StopRequest, hung_rank_message, lost_rank_message


class Trainer:
    """One run on this rank. `Trainer(...)` sets it up (process group, preflight, engine, resume, data, logging,
    evaluation), `train()` runs it to `optim.max_steps` or to a stop request, delivering the model when it ends."""

    def __init__(self, recipe: Recipe, sets: list, model_config: dict, *, resume: bool = False,
                 resume_command: str = "the same command with --resume"):
        """`sets`: the recipe's `mixing.LanguageSet`s and `model_config` its config.json, both from
        `recipe.checks.check_against_data_and_model`; `resume_command`: what continues this run, for messages."""
        self.recipe, self.sets, self.model_config = recipe, sets, model_config
        self.resume_command = resume_command
        self.run = RunFolder(recipe.output_dir)
        self.stop = StopRequest(self.run.stop_file)
        self._start_process_group()
        self._preflight()
        _seed_everything(recipe.seed)
        self.point = find_resume_point(self.run) if resume else None
        self._write_run_files()
        self._build_engine()
        self._restore()
        self._build_data()
        self._build_logging()
        from launcher.training.periodic import PeriodicEval

        self.evaluator = PeriodicEval(recipe, sets, self.engine, self.processor, self.device, self.dtype,
                                      self.logger, self.watchdog)

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _start_process_group(self) -> None:
        from deepspeed.accelerator import get_accelerator

        self.gpu = on_gpu()
        minutes = self.recipe.deepspeed.timeout_minutes
        init_distributed(self.gpu, process_group_minutes(minutes), self.recipe.logging.verbose)
        self.peers = Peers()
        self.watchdog = Watchdog(minutes, hung_rank_message(minutes), self.peers)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        accelerator = get_accelerator()
        if self.gpu:
            accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = torch.device(accelerator.device_name(), accelerator.current_device() if self.gpu else None)

    def _preflight(self) -> None:
        """`launcher doctor`'s checks on every rank (a few collectives, no model): all ranks stop together, before
        the first hour is spent, if the run folder is not shared, the code or recipe differ, a shard is missing,
        ..."""
        from launcher.doctor import failed, preflight_job

        checks, report = preflight_job(self.recipe)
        if failed(checks):
            if self.rank == 0:
                print(report, file=sys.stderr, flush=True)
            raise LauncherError("the preflight failed (above); `python -m launcher doctor --recipe RECIPE` checks "
                                "again")
        if self.rank == 0 and any(c.status == "WARN" for c in checks):
            print("\n".join(line for line in report.splitlines() if "WARN" in line), file=sys.stderr, flush=True)

    def _write_run_files(self) -> None:
        """The DeepSpeed config for this world (loading a checkpoint written by another number of ranks needs
        DeepSpeed's universal form), and the resolved recipe and that config in the run folder."""
        # LOCAL_SIZE: DeepSpeed's launcher; LOCAL_WORLD_SIZE: torchrun
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or self.world)
        self.ds_config = deepspeed_config(self.recipe, self.world, on_gpu=self.gpu, nodes=max(1, self.world // local),
                                          d_model=self.model_config.get("d_model"))
        self.regrouped = self.point is not None and self.point.world_size != self.world
        if self.regrouped:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.recipe_text = recipe_yaml(self.recipe)
        if self.rank == 0:
            self.run.root.mkdir(parents=True, exist_ok=True)
            self.run.recipe.write_text(self.recipe_text, encoding="utf-8")
            self.run.ds_config.write_text(json.dumps(self.ds_config, indent=2) + "\n", encoding="utf-8")
        dist.barrier()

    def _build_engine(self) -> None:
        import deepspeed

        from launcher.model import DTYPES, input_frames, load_model

        model, self.processor = load_model(self.recipe)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=trainable,
                                                                config=self.ds_config)
        self.dtype = DTYPES[self.recipe.deepspeed.precision]
        self.window_frames = input_frames(model.config)

    def _restore(self) -> None:
        """The loop's state and this rank's data position: a fresh start, or the checkpoint's (weights, optimizer,
        scheduler, RNG, what every rank had trained on), with the logs cut back to its step."""
        from launcher.data.mixing import Mix
        from launcher.data.plan import DataPlan, TrainedPositions, resume_position

        data = self.recipe.data
        self.mix = Mix.of(self.sets, data.train_split, data.mix_temperature, seed=self.recipe.seed,
                          shuffle=data.shuffle)
        self.workers = max(data.num_workers, 1)
        self.loop = LoopState(world_size=self.world)
        self.plan, self.trained, self.skip = DataPlan(), TrainedPositions(self.workers, 0), 0
        point = self.point
        if point is None:
            return
        old_states = load_checkpoint(self.engine, point, to_universal(point) if self.regrouped else point.tag)
        self.loop = dataclasses.replace(point.loop, world_size=self.world)  # point.world_size: the writers' number
        if self.rank < len(old_states):
            set_rng_state(old_states[self.rank]["rng"])
        self.plan, self.trained, self.skip = resume_position(
            [s["loader"] for s in old_states], self.mix.total, world_size=self.world, rank=self.rank,
            workers=self.workers, batches=self.loop.batches)
        from launcher.training.runlog import truncate_jsonl

        if self.rank == 0:
            truncate_jsonl(self.run.train_log, self.loop.step)
        if self.recipe.logging.sample_ids:
            truncate_jsonl(self.run.samples_log(self.rank), self.loop.step)

    def _build_data(self) -> None:
        """This rank's stream of batches (`launcher.data`), from where the run stands."""
        from launcher.data.labels import LabelEncoder
        from launcher.data.loader import train_loader
        from launcher.data.stream import ShardStream, StreamSettings

        data, model = self.recipe.data, self.recipe.model
        labels = LabelEncoder(self.processor.tokenizer, self.sets[0].language, model.task,
                              normalize=data.target_text == "normalized", timestamps=data.timestamp_probability > 0,
                              vocab_size=self.model_config.get("vocab_size"))
        settings = StreamSettings.from_recipe(self.recipe, self.window_frames)
        stream = ShardStream(self.mix, labels, settings, rank=self.rank, world_size=self.world, plan=self.plan,
                             skip_batches=self.skip, languages=[s.language for s in self.sets])
        self.learn_language = model.train_language_token
        if self.learn_language is None:
            self.learn_language = len(self.sets) > 1
        self.packed = settings.pack is not None
        self.batches = iter(train_loader(stream, data.num_workers, pin_memory=self.gpu,
                                         learn_language=self.learn_language))

    def _build_logging(self) -> None:
        from launcher.training.runlog import RunLogger, SampleLog

        logging = self.recipe.logging
        self.samples = SampleLog(self.run.samples_log(self.rank), self.packed) if logging.sample_ids else None
        self.logger = RunLogger(self.run, enabled=self.rank == 0, max_steps=self.recipe.optim.max_steps,
                                start_step=self.loop.step, tensorboard=logging.tensorboard,
                                wandb_project=logging.wandb_project if logging.wandb else None,
                                wandb_config=self.recipe.model_dump(mode="json"), wandb_id=self.loop.wandb_id)
        self.loop.wandb_id = self.logger.wandb_id
        if self.point is not None:
            self.logger.print(f"resumed from step {self.loop.step} ({self.point.folder / self.point.tag})" + (
                f", written by {self.point.world_size} ranks, on {self.world}: the rest of epoch "
                f"{self.plan.start_epoch} onwards is re-planned" if self.regrouped else ""))
        if len(self.sets) > 1:
            self.logger.print(f"mix: {self.mix.describe([s.language for s in self.sets])}; language token "
                              f"{'learnt' if self.learn_language else 'not learnt'}")

    # ---- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> bool:
        """Run to `optim.max_steps` and deliver the model (True), or stop on request with a checkpoint (False). A
        collective that fails because another rank went away ends this rank with one line naming that rank."""
        try:
            return self._train()
        except RuntimeError:
            lost = self.peers.lost()
            if not lost:
                raise
            latest = self.run.latest.read_text().strip() if self.run.latest.is_file() else None
            raise LauncherError(lost_rank_message(self.peers.describe(lost), latest, self.resume_command)) from None

    def _train(self) -> bool:
        optim, checkpoints = self.recipe.optim, self.recipe.checkpoint
        self.window, self.grad_norm, finished = LogWindow(self.device), 0.0, True
        self.watchdog.start()
        for step in range(self.loop.step + 1, optim.max_steps + 1):
            self.window.start_step()
            self.watchdog.beat()
            self.engine.train()
            result = train_step(self.engine, self.batches, optim.grad_accum, self.device, self.dtype,
                                window=self.window_frames)
            self._account(step, result)
            self.window.end_step()
            stop = self._sync(step)
            evaluated = self.evaluator.due(step)
            if evaluated:
                self.evaluator.run(step, self.loop)
            if evaluated or stop or step == optim.max_steps or (checkpoints.every_steps and
                                                                 step % checkpoints.every_steps == 0):
                self.save()
            if stop:
                self.stop.done()
                self.logger.print(f"stopped on request at step {step}: checkpoint saved, continue with --resume")
                finished = False
                break
        if self.samples:
            self.samples.close()
        if finished:
            self.evaluator.deliver(self.loop)
        self.watchdog.stop()
        self.logger.close()
        dist.barrier()
        return finished

    def _account(self, step: int, result: StepResult) -> None:
        """A step's batches into the data position, the logging window and the sample log; a step DeepSpeed
        skipped (gradients not finite) named and counted."""
        for batch in result.batches:
            self.trained.update(batch)
        self.window.add(result)
        if self.samples:
            self.samples.write(step, result.batches)
        self.loop.step, self.loop.batches = step, self.loop.batches + self.recipe.optim.grad_accum
        if self.engine.was_step_applied():
            self.loop.nonfinite_in_row = 0
        else:
            self._skipped_step(step, result)

    def _sync(self, step: int) -> bool:
        """At a sync step (a logging step, or every SYNC_EVERY): the one all-reduce of the window's numbers and any
        stop request, and at a logging step its line in the log. Returns whether the ranks agreed to stop."""
        logged = step % self.recipe.logging.every_steps == 0 or step == self.recipe.optim.max_steps
        if not (logged or step % SYNC_EVERY == 0):
            return False
        totals = self.window.reduce(self.stop.requested)
        if logged:
            if self.engine.was_step_applied():
                self.grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            self.logger.log(self.window.record(totals, step=step, lr=float(self.scheduler.get_last_lr()[0]),
                                               grad_norm=self.grad_norm))
            self.window = LogWindow(self.device, epoch=self.window.epoch)
        return totals.stop

    def save(self) -> None:
        """Collective: a checkpoint of the engine, the loop and every rank's RNG and data position."""
        from launcher.data.plan import loader_state

        self.watchdog.beat()
        rank_state = {"rng": rng_state(), "loader": loader_state(self.plan, self.trained, world_size=self.world,
                                                                  rank=self.rank, workers=self.workers)}
        save_checkpoint(self.engine, self.run, self.loop, rank_state, keep_last=self.recipe.checkpoint.keep_last,
                        recipe_text=self.recipe_text)
        self.watchdog.beat()

    def _skipped_step(self, step: int, result: StepResult) -> None:
        """DeepSpeed skipped the step (its gradients were not finite; the same on every rank). If a loss was not
        finite anywhere, name those samples (gathered from every rank), count it, and stop after
        `optim.max_consecutive_nonfinite` in a row; a step skipped with finite losses is fp16's loss scaler at
        work, DeepSpeed's business."""
        limit = self.recipe.optim.max_consecutive_nonfinite
        ids = [i for batch, loss in zip(result.batches, result.losses, strict=True)
               if not bool(torch.isfinite(loss)) for i in batch["ids"]]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, ids)
        names = [i for part in gathered for i in part]
        if not names:
            return
        self.loop.nonfinite_in_row += 1
        self.window.skipped += 1
        self.logger.print(f"step {step}: non-finite loss, step skipped on every rank; samples: {', '.join(names)}")
        if self.loop.nonfinite_in_row >= limit:
            raise LauncherError(f"{limit} steps in a row had a non-finite loss (last at step {step}, samples: "
                                f"{', '.join(names)}); check these samples and the learning rate "
                                f"(optim.max_consecutive_nonfinite={limit})")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
