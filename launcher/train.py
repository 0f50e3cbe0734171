"""The training loop around the DeepSpeed engine; `train_ds.py` is its entry point.

Everything that can be wrong with a recipe is checked before the process group starts. Then every rank
builds the same model, streams its own part of the shards (launcher.data) and runs exactly
`optim.max_steps` optimizer steps, so no rank waits forever for another.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from launcher.distributed import init_distributed, shutdown_distributed
from launcher.errors import LauncherError
from launcher.recipe import Recipe, check_against_data_and_model, deepspeed_config, load_recipe, recipe_yaml


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_ds.py", description="Fine-tune Whisper with DeepSpeed from a recipe.")
    p.add_argument("--recipe", required=True, type=Path)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe fields, e.g. --set optim.lr=1e-5 deepspeed.zero_stage=3")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    return p.parse_args(argv)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_against_data_and_model(recipe)
        _check_precision(recipe)
    except LauncherError as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(recipe, resume=args.resume)  # stopped on request (SIGTERM) or finished: both exit 0
        shutdown_distributed()
    except BaseException as e:  # noqa: BLE001 - a failing rank must die now, not hang in exit handlers
        rank = os.environ.get("RANK", 0)
        if isinstance(e, LauncherError):
            print(f"error (rank {rank}): {e}", file=sys.stderr)
        elif isinstance(e, RuntimeError) and "timed out" in str(e).lower():
            print(f"error (rank {rank}): no answer from another rank within deepspeed.timeout_minutes="
                  f"{recipe.deepspeed.timeout_minutes:g}: a rank is hung or dead (or the network between nodes is "
                  f"down), so the job stops; continue from the last checkpoint with --resume\n  ({e})",
                  file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Python's normal exit would join loader workers, flush writers and tear down the process group while
        # other ranks wait in a collective for this one: leave at once, and DeepSpeed's launcher stops the rest.
        os._exit(2 if isinstance(e, LauncherError) else 1)
    return 0


def _on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def _check_precision(recipe: Recipe) -> None:
    import torch

    precision = recipe.deepspeed.precision
    if precision == "fp32":
        return
    if not _on_gpu():
        raise LauncherError(f"deepspeed.precision: got {precision!r}, expected 'fp32' without a GPU "
                            "(add --set deepspeed.precision=fp32 for a CPU run)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise LauncherError("deepspeed.precision: got 'bf16', but this GPU has no bf16 (it needs Ampere or newer); "
                            "use fp16")


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe):
    """The model and processor from `model.name_or_path`, configured for training as the recipe says."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    m = recipe.model
    processor = WhisperProcessor.from_pretrained(m.name_or_path)
    model = WhisperForConditionalGeneration.from_pretrained(m.name_or_path, attn_implementation=m.attn_implementation,
                                                            dtype=torch.float32)
    model.config.use_cache = False  # the cache only serves generation; in training it costs memory
    sa = m.spec_augment
    model.config.apply_spec_augment = sa.enabled
    model.config.mask_time_prob, model.config.mask_time_length = sa.mask_time_prob, sa.mask_time_length
    model.config.mask_feature_prob, model.config.mask_feature_length = sa.mask_feature_prob, sa.mask_feature_length
    model.generation_config.forced_decoder_ids = None
    if m.freeze_encoder:
        model.model.encoder.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


class StopRequest:
    """SIGTERM (SLURM preemption, spot reclaim) or SIGINT sets a flag; the loop checks it on every rank at each
    step boundary (one all-reduce), so all ranks agree on the step at which they save and leave."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after `step`: they were logged after the checkpoint being resumed and will be redone."""
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):  # a line torn by the kill
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)


def train(recipe: Recipe, resume: bool = False) -> bool:
    """Run the recipe on every rank. Returns False when it stopped early on request (a checkpoint is saved)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from launcher.checkpoint import (
        find_resume_point,
        load_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
        to_universal,
    )
    from launcher.data import (
        Consumed,
        DataPlan,
        ShardStream,
        Targets,
        loader_state,
        resume_position,
        split_shards,
        train_loader,
    )
    from launcher.runlog import RunLogger

    stop = StopRequest()
    on_gpu = _on_gpu()
    init_distributed(on_gpu, recipe.deepspeed.timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = get_accelerator()
    if on_gpu:
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(accelerator.device_name(), accelerator.current_device() if on_gpu else None)
    _seed_everything(recipe.seed)

    run_dir = Path(recipe.output_dir)
    ds_config = deepspeed_config(recipe, world, on_gpu=on_gpu)
    point = find_resume_point(run_dir) if resume else None
    regrouped = point is not None and point.world_size != world
    if regrouped:  # ZeRO partitions cut for another number of ranks load only in DeepSpeed's universal form
        ds_config["checkpoint"] = {"load_universal": True}
    recipe_text = recipe_yaml(recipe)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
    dist.barrier()

    model, processor = build_model(recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[recipe.deepspeed.precision]

    loop = {"step": 0, "batches": 0, "best": [], "wandb_id": None, "world_size": world, "nonfinite_in_row": 0}
    samples_log = run_dir / "samples" / f"rank-{rank}.jsonl" if recipe.logging.sample_ids else None
    shards = split_shards(recipe.data.shards, recipe.data.train_split)
    total = sum(s.samples for s in shards)
    workers = max(recipe.data.num_workers, 1)
    plan, consumed, skip = DataPlan(), Consumed(workers, 0), 0
    if point is not None:
        old_states = load_checkpoint(engine, point, to_universal(point) if regrouped else point.tag)
        loop = {**point.loop, "world_size": world}
        if rank < len(old_states):
            set_rng_state(old_states[rank]["rng"])
        plan, consumed, skip = resume_position([s["loader"] for s in old_states], total, world_size=world, rank=rank,
                                               workers=workers, batches=loop["batches"])
        if rank == 0:
            _truncate_jsonl(run_dir / "train_log.jsonl", loop["step"])
        if samples_log:
            _truncate_jsonl(samples_log, loop["step"])
    targets = Targets(processor.tokenizer, recipe.model.language, recipe.model.task,
                      normalize=recipe.data.target_text == "normalized")
    stream = ShardStream(shards, targets, rank=rank, world_size=world, seed=recipe.seed, shuffle=recipe.data.shuffle,
                         shuffle_buffer=recipe.data.shuffle_buffer, batch_size=recipe.data.batch_size_per_gpu,
                         plan=plan, skip_batches=skip, verify=recipe.data.verify_shards,
                         on_bad_data=recipe.data.on_bad_data)
    batches = iter(train_loader(stream, recipe.data.num_workers, pin_memory=on_gpu))
    if samples_log:
        samples_log.parent.mkdir(parents=True, exist_ok=True)
        # line-buffered: every step's ids are on disk before the next step, whatever kills the process
        samples_out = open(samples_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed at the end

    o, lg, ck = recipe.optim, recipe.logging, recipe.checkpoint
    logger = RunLogger(run_dir, enabled=rank == 0, max_steps=o.max_steps, start_step=loop["step"],
                       tensorboard=lg.tensorboard, wandb_project=lg.wandb_project if lg.wandb else None,
                       wandb_config=recipe.model_dump(mode="json"), wandb_id=loop.get("wandb_id"))
    loop["wandb_id"] = logger.wandb_id
    if point is not None:
        logger.print(f"resumed from step {loop['step']} ({point.folder / point.tag})" + (
            f", written by {point.world_size} ranks, on {world}: the rest of epoch {plan.start_epoch} onwards is "
            f"re-planned" if regrouped else ""))
    evaluator = PeriodicEval(recipe, engine, processor, device, dtype, logger)

    def save(step: int) -> None:
        rank_state = {"rng": rng_state(), "loader": loader_state(plan, consumed, world_size=world, rank=rank,
                                                                  workers=workers)}
        save_checkpoint(engine, run_dir, step, loop, rank_state, keep_last=ck.keep_last,
                        keep={tag for _, tag in loop["best"]}, recipe_text=recipe_text)

    window = {"loss": torch.zeros((), device=device), "micro": 0, "samples": 0, "tokens": 0, "dropped": 0,
              "bad": 0, "skipped": 0, "t": time.perf_counter()}
    epoch, finished = 0, True
    for step in range(loop["step"] + 1, o.max_steps + 1):
        engine.train()
        nonfinite_ids: list[str] = []  # this rank's samples in a micro-batch whose loss was not finite
        skipped = False
        for _ in range(o.grad_accum):
            batch = next(batches)
            consumed.update(batch)
            features = batch["input_features"].to(device, dtype, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            loss = engine(input_features=features, labels=labels).loss
            finite = torch.isfinite(loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # one rank's NaN skips the step everywhere
            if finite.item():
                engine.backward(loss)
                engine.step()
                window["loss"] += loss.detach().float()
                window["micro"] += 1
            else:
                skipped = True
                nonfinite_ids += batch["ids"] if not torch.isfinite(loss.detach()) else []
                if o.grad_accum > 1:
                    engine.step()  # keeps DeepSpeed's accumulation count; this micro-batch adds no gradient
            window["samples"] += len(batch["ids"])
            window["tokens"] += int((batch["labels"] != -100).sum())
            window["dropped"] += batch["dropped_long"]
            window["bad"] += batch["bad_data"]
            epoch = max(epoch, batch["epoch"])
            if samples_log:
                samples_out.write(json.dumps({"step": step, "ids": batch["ids"], "epochs": batch["epochs"]}) + "\n")
        loop.update(step=step, batches=loop["batches"] + o.grad_accum)
        _handle_nonfinite(step, skipped, nonfinite_ids, loop, window, logger, o.max_consecutive_nonfinite)
        if step % lg.every_steps == 0 or step == o.max_steps:
            stats = torch.tensor([float(window["loss"]), window["micro"], window["samples"], window["tokens"],
                                  window["dropped"], window["bad"]], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            elapsed = time.perf_counter() - window["t"]
            logger.log({"step": step, "loss": float(stats[0] / max(stats[1], 1)),
                        "lr": float(scheduler.get_last_lr()[0]),
                        "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                        "samples_per_s": float(stats[2]) / elapsed, "tokens_per_s": float(stats[3]) / elapsed,
                        "epoch": epoch, "dropped_long_labels": int(stats[4]), "skipped_bad_samples": int(stats[5]),
                        "skipped_nonfinite_steps": window["skipped"]})
            window.update(loss=torch.zeros((), device=device), micro=0, samples=0, tokens=0, dropped=0, bad=0,
                          skipped=0)
        evaluated = evaluator.due(step) and evaluator.run(step, loop)
        saved = evaluated or step == o.max_steps or bool(ck.every_steps and step % ck.every_steps == 0)
        if saved:
            save(step)
        if stop.agreed(device):
            if not saved:
                save(step)
            logger.print(f"stopped on request at step {step}: checkpoint saved, continue with --resume")
            finished = False
            break
        window["t"] = time.perf_counter()  # evaluation and saving are not training throughput
    if samples_log:
        samples_out.close()
    if finished:
        evaluator.finish(loop)
    logger.close()
    dist.barrier()
    return finished


def _handle_nonfinite(step: int, skipped: bool, ids: list[str], loop: dict, window: dict, logger, limit: int) -> None:
    """Count steps skipped for a non-finite loss (`skipped` is the same on every rank), name their samples
    (gathered from every rank) and stop after `limit` in a row."""
    import torch.distributed as dist

    if not skipped:
        loop["nonfinite_in_row"] = 0
        return
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ids)
    names = [i for part in gathered for i in part]
    loop["nonfinite_in_row"] = loop.get("nonfinite_in_row", 0) + 1
    window["skipped"] += 1
    logger.print(f"step {step}: non-finite loss, step skipped on every rank; samples: {', '.join(names)}")
    if loop["nonfinite_in_row"] >= limit:
        raise LauncherError(f"{limit} steps in a row had a non-finite loss (last at step {step}, samples: "
                            f"{', '.join(names)}); check these samples and the learning rate "
                            f"(optim.max_consecutive_nonfinite={limit})")


class PeriodicEval:
    """Evaluation inside training: every `eval.every_steps` on the eval splits (never test), best-k checkpoints
    by WER on the first split, and at the end the delivered model (best by WER, else the last weights) is
    scored on test and exported to final/ with its model card."""

    def __init__(self, recipe: Recipe, engine, processor, device, dtype, logger):
        from launcher.evaluate import DecodeSettings

        self.recipe, self.engine, self.processor = recipe, engine, processor
        self.device, self.dtype, self.logger = device, dtype, logger
        self.run_dir = Path(recipe.output_dir)
        e = recipe.eval
        self.settings = DecodeSettings(language=recipe.model.language, task=recipe.model.task,
                                       batch_size=e.batch_size_per_gpu or recipe.data.batch_size_per_gpu,
                                       num_beams=e.num_beams, max_new_tokens=e.max_new_tokens)
        self.recipe_text = recipe_yaml(recipe)

    def due(self, step: int) -> bool:
        every = self.recipe.eval.every_steps
        return bool(every) and (step % every == 0 or step == self.recipe.optim.max_steps)

    def _evaluate(self, split: str, step: int | None, max_samples: int | None) -> dict:
        import torch.distributed as dist

        from launcher.evaluate import evaluate

        report = evaluate(self.engine.module, self.processor.tokenizer, self.recipe.data.shards, split, self.settings,
                          device=self.device, dtype=self.dtype, max_samples=max_samples,
                          out_dir=self.run_dir / "eval", step=step, model_name=str(self.run_dir),
                          recipe_text=self.recipe_text)
        shared = [report]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def run(self, step: int, loop: dict) -> bool:
        """Evaluate every eval split; returns True (a checkpoint is then saved at this step)."""
        from launcher.checkpoint import export_hf

        reports = [self._evaluate(split, step, self.recipe.eval.max_samples) for split in self.recipe.eval.splits]
        for r in reports:
            self.logger.scalars(f"eval/{r['split']}", step, {k: r[k] for k in ("wer", "wer_orthographic", "cer")})
            self.logger.print(f"step {step}: {r['split']} WER {r['wer']:.2f}% (orthographic "
                              f"{r['wer_orthographic']:.2f}%, CER {r['cer']:.2f}%) on {r['scored']} clips")
        wer, tag = reports[0]["wer"], f"step-{step}"
        # lowest WER first; on a tie the later (longer trained) checkpoint wins
        best = sorted([*loop["best"], [wer, tag]], key=lambda b: (b[0], -int(b[1].split("-")[1])))
        best = best[: self.recipe.checkpoint.keep_best]
        if [wer, tag] in best and best[0] == [wer, tag]:
            export_hf(self.engine, self.run_dir / "best", self.processor, self._generation())
        loop["best"] = best
        return True

    def _generation(self) -> dict:
        return {"language": self.recipe.model.language, "task": self.recipe.model.task}

    def finish(self, loop: dict) -> None:
        from launcher.card import write_model_card
        from launcher.checkpoint import export_hf
        from launcher.index import load_index

        selected, step = f"last step ({loop['step']})", loop["step"]
        if loop["best"]:
            wer, tag = loop["best"][0]
            self.engine.load_checkpoint(str(self.run_dir / "checkpoints"), tag=tag, load_optimizer_states=False,
                                        load_lr_scheduler_states=False)
            selected, step = f"{tag}, best {self.recipe.eval.splits[0]} WER {wer:.2f}%", int(tag.split("-")[1])
        final = self.run_dir / "final"
        export_hf(self.engine, final, self.processor, self._generation())
        index = load_index(self.recipe.data.shards)
        test = None
        if "test" in index["splits"] and self.recipe.eval.test_at_end:
            test = self._evaluate("test", step, None)
        if self.logger.enabled:
            if test is not None:
                write_model_card(final, name=self.run_dir.name, base_model=self.recipe.model.name_or_path,
                                 language=self.recipe.model.language, source=index.get("source", {}), report=test,
                                 steps=loop["step"], selected=selected)
                self.logger.print(f"test WER {test['wer']:.2f}% (orthographic {test['wer_orthographic']:.2f}%, "
                                  f"CER {test['cer']:.2f}%) of {selected}")
            self.logger.print(f"done: {loop['step']} steps. Model: {final}  log: {self.run_dir / 'train_log.jsonl'}")
