"""The training loop around the DeepSpeed engine; `train_ds.py` (or `deepspeed --module launcher.train`) runs it.

Everything that can be wrong with a recipe is checked before the process group starts. Then every rank builds the
same model, streams its own part of the shards (launcher.data) and runs exactly `optim.max_steps` optimizer steps,
so no rank waits forever for another.

Per step the loop adds nothing that waits for the device or for other ranks: losses are summed on the device, a
step whose gradients are not finite is skipped by DeepSpeed itself (its global gradient norm is the same on every
rank), and the ranks talk only at "sync steps" (logging steps, at most SYNC_EVERY steps apart), where one
all-reduce carries the window's numbers and any stop request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from launcher.distributed import Watchdog, init_distributed, on_gpu, process_group_minutes, shutdown_distributed
from launcher.errors import LauncherError
from launcher.launch import STOP_FILE
from launcher.recipe import Recipe, check_against_data_and_model, deepspeed_config, load_recipe, recipe_yaml

SYNC_EVERY = 10  # steps between the ranks' agreements on a stop request, when logging is rarer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_ds.py", description="Fine-tune Whisper with DeepSpeed from a recipe.")
    p.add_argument("--recipe", required=True, type=Path)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe fields, e.g. --set optim.lr=1e-5 deepspeed.zero_stage=3")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    return p.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def hung_rank_message(minutes: float) -> str:
    return (f"error (rank {_rank()}): no answer from another rank within deepspeed.timeout_minutes={minutes:g}: a rank "
            f"is hung or dead (or the network between nodes is down), so the job stops; continue from the last "
            f"checkpoint with --resume")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        sets, config = check_against_data_and_model(recipe)
        _check_precision(recipe)
    except LauncherError as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from launcher.console import quiet_libraries

    quiet_libraries(_rank(), recipe.logging.verbose)
    try:
        train(recipe, sets, config, resume=args.resume)  # stopped on request (SIGTERM) or finished: both exit 0
        shutdown_distributed()
    except BaseException as e:  # noqa: BLE001 - a failing rank must die now, not hang in exit handlers
        code = 2 if isinstance(e, LauncherError) else 1
        try:  # whoever read our output may be gone (a broken pipe): leave all the same
            if isinstance(e, LauncherError):
                print(f"error (rank {_rank()}): {e}", file=sys.stderr)
            elif isinstance(e, RuntimeError) and "timed out" in str(e).lower():
                print(f"{hung_rank_message(recipe.deepspeed.timeout_minutes)}\n  ({e})", file=sys.stderr)
            else:
                traceback.print_exc()
                advice = _advice(traceback.format_exc())
                if advice:
                    print(f"error (rank {_rank()}): {advice}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            # Python's normal exit would join loader workers, flush writers and tear down the process group while
            # other ranks wait in a collective for this one: leave at once, and DeepSpeed's launcher stops the rest.
            os._exit(code)
    return 0


def _advice(text: str) -> str | None:
    """The launcher's one line of advice for a known failure (the rendezvous port taken, ...), if any."""
    try:
        from launcher.launch import explain_launch_failure
    except ImportError:
        return None
    return explain_launch_failure(1, text)


def _check_precision(recipe: Recipe) -> None:
    import torch

    precision = recipe.deepspeed.precision
    if precision == "fp32":
        return
    if not on_gpu():
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


class StopRequest:
    """SIGTERM or SIGINT (SLURM preemption, spot reclaim, Ctrl-C), or the file output_dir/STOP, asks the run to
    save and stop; the ranks agree on it at the next sync step, so all save at the same step. The file is how the
    SLURM script and `launch --run` ask (DeepSpeed's launcher kills ranks 30 s after it is signalled itself, too
    soon for a large checkpoint); rank 0 removes it once the checkpoint is saved."""

    def __init__(self, stop_file: Path) -> None:
        self.signalled = False
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def done(self) -> None:
        if _rank() == 0:
            self.stop_file.unlink(missing_ok=True)

    @property
    def requested(self) -> bool:
        """This rank's view (rank 0 also looks for the stop file, on the shared run folder)."""
        return self.signalled or (_rank() == 0 and self.stop_file.exists())


@dataclass
class Window:
    """What the loop sums between two logged steps. Losses stay on the device (no wait per step)."""

    loss: object  # tensor: sum of finite micro-batch losses
    finite: object  # tensor: how many micro-batch losses were finite
    samples: int = 0  # clips (a packed window counts each of its clips)
    tokens: int = 0
    audio: float = 0.0  # seconds of the clips' audio
    dropped: int = 0
    bad: int = 0
    skipped: int = 0
    seconds: float = 0.0  # time spent in training steps (data wait included; evaluation and saving not)

    @classmethod
    def new(cls, device) -> Window:
        import torch

        return cls(loss=torch.zeros((), device=device), finite=torch.zeros((), device=device))


@dataclass
class StepResult:
    batches: list[dict]  # the micro-batches of the step, on the host
    losses: list = field(default_factory=list)  # their loss tensors, on the device


def train_step(engine, batches, grad_accum: int, device, dtype) -> StepResult:
    """One optimizer step: `grad_accum` micro-batches forward and backward, then DeepSpeed's step. Waits for
    nothing: a non-finite loss gives non-finite gradients, and DeepSpeed skips a step whose global gradient norm
    is not finite on every rank alike (`engine.was_step_applied()`)."""
    from launcher.features import pad_batch

    result = StepResult([])
    for _ in range(grad_accum):
        batch = next(batches)
        stored, frames, pads = (batch[k].to(device, non_blocking=True) for k in ("features", "frames", "pads"))
        features = pad_batch(stored, frames, pads, dtype)  # Whisper's 30 s window, made on the device
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


def _preflight(recipe: Recipe) -> None:
    """`launcher doctor`'s checks on every rank (a few collectives, no model): all ranks stop together, before the
    first hour is spent, if the run folder is not shared, the code or recipe differ, a shard is missing, ..."""
    from launcher.doctor import failed, preflight_job

    checks, report = preflight_job(recipe)
    if failed(checks):
        if _rank() == 0:
            print(report, file=sys.stderr, flush=True)
        raise LauncherError("the preflight failed (above); `python -m launcher doctor --recipe RECIPE` checks again")
    if _rank() == 0 and any(c.status == "WARN" for c in checks):
        print("\n".join(line for line in report.splitlines() if "WARN" in line), file=sys.stderr, flush=True)


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


def train(recipe: Recipe, sets: list, model_config: dict, resume: bool = False) -> bool:
    """Run the recipe on every rank (`sets`: its `mixing.LanguageSet`s, from `check_against_data_and_model`).
    Returns False when it stopped early on request (a checkpoint is saved)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from launcher.checkpoint import (
        LoopState,
        find_resume_point,
        load_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
        to_universal,
    )
    from launcher.data import (
        DataPlan,
        ShardStream,
        TrainedPositions,
        loader_state,
        resume_position,
        train_loader,
    )
    from launcher.labels import LabelEncoder
    from launcher.mixing import Mix
    from launcher.model import DTYPES, load_model
    from launcher.packing import PackSettings
    from launcher.periodic import PeriodicEval
    from launcher.runlog import RunLogger

    run_dir = Path(recipe.output_dir)
    stop = StopRequest(run_dir / STOP_FILE)
    gpu = on_gpu()
    minutes = recipe.deepspeed.timeout_minutes
    init_distributed(gpu, process_group_minutes(minutes), recipe.logging.verbose)
    watchdog = Watchdog(minutes, hung_rank_message(minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = get_accelerator()
    if gpu:
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(accelerator.device_name(), accelerator.current_device() if gpu else None)
    _preflight(recipe)
    _seed_everything(recipe.seed)

    nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    ds_config = deepspeed_config(recipe, world, on_gpu=gpu, nodes=nodes, d_model=model_config.get("d_model"))
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

    model, processor = load_model(recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    dtype = DTYPES[recipe.deepspeed.precision]

    loop = LoopState(world_size=world)
    samples_log = run_dir / "samples" / f"rank-{rank}.jsonl" if recipe.logging.sample_ids else None
    data = recipe.data
    mix = Mix.of(sets, data.train_split, data.mix_temperature, seed=recipe.seed, shuffle=data.shuffle)
    total = mix.total
    workers = max(recipe.data.num_workers, 1)
    plan, trained, skip = DataPlan(), TrainedPositions(workers, 0), 0
    if point is not None:
        old_states = load_checkpoint(engine, point, to_universal(point) if regrouped else point.tag)
        loop = dataclasses.replace(point.loop, world_size=world)  # point.world_size stays the writers' number
        if rank < len(old_states):
            set_rng_state(old_states[rank]["rng"])
        plan, trained, skip = resume_position([s["loader"] for s in old_states], total, world_size=world, rank=rank,
                                              workers=workers, batches=loop.batches)
        if rank == 0:
            _truncate_jsonl(run_dir / "train_log.jsonl", loop.step)
        if samples_log:
            _truncate_jsonl(samples_log, loop.step)
    labels = LabelEncoder(processor.tokenizer, sets[0].language, recipe.model.task,
                          normalize=data.target_text == "normalized", timestamps=data.timestamp_probability > 0,
                          vocab_size=model_config.get("vocab_size"))
    pack = PackSettings.from_seconds(data.pack.max_seconds, data.pack.gap_seconds, data.pack.same_speaker) \
        if data.pack.enabled else None
    stream = ShardStream(mix, labels, rank=rank, world_size=world, seed=recipe.seed, shuffle=data.shuffle,
                         shuffle_buffer=data.shuffle_buffer, batch_size=data.batch_size_per_gpu, plan=plan,
                         skip_batches=skip, verify=data.verify_shards, on_bad_data=data.on_bad_data, pack=pack,
                         timestamp_probability=data.timestamp_probability,
                         prompt_probability=data.prompt_probability, languages=[s.language for s in sets])
    learn_language = recipe.model.train_language_token
    if learn_language is None:
        learn_language = len(sets) > 1
    batches = iter(train_loader(stream, recipe.data.num_workers, pin_memory=gpu, learn_language=learn_language))
    if samples_log:
        samples_log.parent.mkdir(parents=True, exist_ok=True)
        # line-buffered: every step's ids are on disk before the next step, whatever kills the process
        samples_out = open(samples_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed at the end

    optim, logging, checkpoints = recipe.optim, recipe.logging, recipe.checkpoint
    logger = RunLogger(run_dir, enabled=rank == 0, max_steps=optim.max_steps, start_step=loop.step,
                       tensorboard=logging.tensorboard, wandb_project=logging.wandb_project if logging.wandb else None,
                       wandb_config=recipe.model_dump(mode="json"), wandb_id=loop.wandb_id)
    loop.wandb_id = logger.wandb_id
    if point is not None:
        logger.print(f"resumed from step {loop.step} ({point.folder / point.tag})" + (
            f", written by {point.world_size} ranks, on {world}: the rest of epoch {plan.start_epoch} onwards is "
            f"re-planned" if regrouped else ""))
    if len(sets) > 1:
        logger.print(f"mix: {mix.describe([s.language for s in sets])}; language token "
                     f"{'learnt' if learn_language else 'not learnt'}")
    evaluator = PeriodicEval(recipe, sets, engine, processor, device, dtype, logger, watchdog)

    def save() -> None:
        watchdog.beat()
        rank_state = {"rng": rng_state(), "loader": loader_state(plan, trained, world_size=world, rank=rank,
                                                                  workers=workers)}
        save_checkpoint(engine, run_dir, loop, rank_state, keep_last=checkpoints.keep_last, recipe_text=recipe_text)
        watchdog.beat()

    window, epoch, finished, grad_norm = Window.new(device), 0, True, 0.0
    watchdog.start()
    for step in range(loop.step + 1, optim.max_steps + 1):
        started = time.perf_counter()
        watchdog.beat()
        engine.train()
        result = train_step(engine, batches, optim.grad_accum, device, dtype)
        for batch, loss in zip(result.batches, result.losses, strict=True):
            trained.update(batch)
            finite = torch.isfinite(loss)
            window.loss += torch.where(finite, loss, 0.0)
            window.finite += finite
            window.samples += len(batch["ids"])
            window.tokens += batch["tokens"]
            window.audio += batch["seconds"]
            window.dropped += batch["dropped_long"]
            window.bad += batch["bad_data"]
            epoch = max(epoch, batch["epoch"])
            if samples_log:
                record = {"step": step, "ids": batch["ids"], "epochs": batch["epochs"]}
                if pack:  # the clips of each window
                    record["windows"] = batch["windows"]
                samples_out.write(json.dumps(record) + "\n")
        loop.step, loop.batches = step, loop.batches + optim.grad_accum
        if engine.was_step_applied():
            loop.nonfinite_in_row = 0
        else:
            _skipped_step(step, result, loop, window, logger, optim.max_consecutive_nonfinite)
        window.seconds += time.perf_counter() - started
        logged = step % logging.every_steps == 0 or step == optim.max_steps
        stop_agreed = False
        if logged or step % SYNC_EVERY == 0:
            counts = [window.samples, window.tokens, window.dropped, window.bad, window.audio, float(stop.requested)]
            stats = torch.cat([torch.stack([window.loss, window.finite]).double(),
                               torch.tensor(counts, dtype=torch.float64).to(device)])
            dist.all_reduce(stats)  # the one collective the loop adds; a sync step only
            stop_agreed = bool(stats[7] > 0)
            if logged:
                if engine.was_step_applied():
                    grad_norm = float(engine.get_global_grad_norm() or 0.0)
                logger.log({"step": step, "loss": float(stats[0] / max(float(stats[1]), 1.0)),
                            "lr": float(scheduler.get_last_lr()[0]), "grad_norm": grad_norm,
                            "samples_per_s": float(stats[2]) / window.seconds,
                            "tokens_per_s": float(stats[3]) / window.seconds,
                            "audio_s_per_s": float(stats[6]) / window.seconds, "epoch": epoch,
                            "dropped_long_labels": int(stats[4]), "skipped_bad_samples": int(stats[5]),
                            "skipped_nonfinite_steps": window.skipped, "window_s": window.seconds,
                            "time": time.time()})
                window = Window.new(device)
        evaluated = evaluator.due(step)
        if evaluated:
            evaluator.run(step, loop)
        saved = evaluated or step == optim.max_steps or bool(checkpoints.every_steps and
                                                              step % checkpoints.every_steps == 0)
        if saved or stop_agreed:
            save()
        if stop_agreed:
            stop.done()
            logger.print(f"stopped on request at step {step}: checkpoint saved, continue with --resume")
            finished = False
            break
    if samples_log:
        samples_out.close()
    if finished:
        evaluator.deliver(loop)
    watchdog.stop()
    logger.close()
    dist.barrier()
    return finished


def _skipped_step(step: int, result: StepResult, loop, window: Window, logger, limit: int) -> None:
    """DeepSpeed skipped the step (its gradients were not finite; the same on every rank). If a loss was not
    finite anywhere, name those samples (gathered from every rank), count it, and stop after `limit` in a row; a
    step skipped with finite losses is fp16's loss scaler at work, DeepSpeed's business."""
    import torch
    import torch.distributed as dist

    ids = [i for batch, loss in zip(result.batches, result.losses, strict=True)
           if not bool(torch.isfinite(loss)) for i in batch["ids"]]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ids)
    names = [i for part in gathered for i in part]
    if not names:
        return
    loop.nonfinite_in_row += 1
    window.skipped += 1
    logger.print(f"step {step}: non-finite loss, step skipped on every rank; samples: {', '.join(names)}")
    if loop.nonfinite_in_row >= limit:
        raise LauncherError(f"{limit} steps in a row had a non-finite loss (last at step {step}, samples: "
                            f"{', '.join(names)}); check these samples and the learning rate "
                            f"(optim.max_consecutive_nonfinite={limit})")


if __name__ == "__main__":
    raise SystemExit(main())
