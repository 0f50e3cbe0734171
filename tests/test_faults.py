"""Faults injected into real 2-rank CPU training: SIGKILL and exact resume, SIGTERM preemption, non-finite losses,
corrupt shards, and planted secrets. Each test checks one promise of the checkpoint and data contracts."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.shards.format import sha256_file
from tests.conftest import cpu_env, read_log, run_training, start_training

pytestmark = pytest.mark.slow
HF_SECRET, WANDB_SECRET = "hf_PLANTEDsecret0123456789", "wandbPLANTEDsecret9876543210"


def overrides(tiny_model: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={tiny_model}", f"data.shards={shards}", f"output_dir={run_dir}",
            "eval.every_steps=0", "eval.test_at_end=false", "checkpoint.keep_best=0", "logging.every_steps=1",
            *extra]


def wait_for_step(run_dir: Path, step: int, job, timeout: float = 300) -> None:
    """Until the run has logged `step`; `job`: DeepSpeed's launcher (a Popen) or warm ranks (`ranks.Job`)."""
    deadline = time.monotonic() + timeout
    log = run_dir / "train_log.jsonl"
    while time.monotonic() < deadline:
        if not (job.poll() is None if isinstance(job, subprocess.Popen) else job.running):
            raise AssertionError(f"training ended ({job.poll()}) before step {step}")
        if log.is_file() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


EXACT = ("optim.max_steps=24", "checkpoint.every_steps=5", "checkpoint.keep_last=2", "data.num_workers=2",
         "logging.sample_ids=true")


@pytest.fixture(scope="module")
def reference_run(tiny_model, demo_shards, tmp_path_factory):
    """An uninterrupted run, with HF and W&B tokens planted in its environment."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_training(overrides(tiny_model, demo_shards["shards"], run_dir, *EXACT),
                        env={"HF_TOKEN": HF_SECRET, "WANDB_API_KEY": WANDB_SECRET})
    return run_dir, proc.output


def samples_by_step(run_dir: Path) -> dict[int, dict[int, list]]:
    out: dict[int, dict[int, list]] = {}
    for rank_file in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        rank = int(rank_file.stem.split("-")[1])
        for line in rank_file.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rank, {}).setdefault(rec["step"], []).append(list(zip(rec["ids"], rec["epochs"],
                                                                                  strict=True)))
    return out


def packed(demo_shards) -> tuple[str, ...]:
    """Packing on, with timestamped labels and prompts (windows of several clips, decoder inputs built by the
    collate), on two languages mixed 1:1: French's 44 clips at 32 an epoch, Spanish's 20 upsampled to 32."""
    return ("data.pack.enabled=true", "data.pack.max_seconds=6", "data.timestamp_probability=0.5",
            "data.prompt_probability=0.5", "model.language=null",
            f"data.shards=[{{path: {demo_shards['shards']}, weight: 1}}, "
            f"{{path: {demo_shards['shards_es']}, weight: 1}}]")


MIXED = {"fr": (32, 44), "es": (32, 20)}  # language: (clips in an epoch, clips in the set)


def assert_each_clip_once_per_pass(seen: list[tuple[str, int]]) -> None:
    """Over the complete epochs of a two-language run (`packed`): each set in its share, each of its clips once per
    pass over the set (so no clip's count exceeds another's by more than one)."""
    per_epoch = Counter(epoch for _, epoch in seen)
    complete = 0
    while per_epoch[complete] == sum(q for q, _ in MIXED.values()):
        complete += 1
    assert complete >= 2
    for lang, (quota, n) in MIXED.items():
        counts = Counter(i for i, e in seen if e < complete and f"_{lang}_" in i)
        assert sum(counts.values()) == complete * quota and len(counts) == n, lang
        assert max(counts.values()) - min(counts.values()) <= 1, f"{lang}: a clip twice in a pass"


@pytest.fixture(scope="module")
def packed_reference_run(tiny_model, demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("packed-reference") / "run"
    run_training(overrides(tiny_model, demo_shards["shards"], run_dir, *EXACT, *packed(demo_shards)))
    return run_dir


def windows_by_step(run_dir: Path) -> dict[int, dict[int, list]]:
    """{rank: {step: the clips of each window}} from the sample-id log."""
    out: dict[int, dict[int, list]] = {}
    for rank_file in (run_dir / "samples").glob("rank-*.jsonl"):
        records = [json.loads(line) for line in rank_file.read_text().splitlines()]
        out[int(rank_file.stem.split("-")[1])] = {r["step"]: r["windows"] for r in records}
    return out


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed-two-languages"])
def test_resume_after_sigkill_matches_uninterrupted_losses_and_sees_each_sample_once_per_epoch(
        request, tiny_model, demo_shards, tmp_path, pack):
    reference = request.getfixturevalue("packed_reference_run") if pack else \
        request.getfixturevalue("reference_run")[0]
    run_dir = tmp_path / "run"
    args = overrides(tiny_model, demo_shards["shards"], run_dir, *EXACT, *(packed(demo_shards) if pack else ()))
    with start_training(args) as job:
        wait_for_step(run_dir, 13, job)
        job.kill(signal.SIGKILL)  # both ranks and their loader workers, mid-step
        job.wait()
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest in ("step-10", "step-15", "step-20") and read_log(run_dir)[-1]["step"] < 24, "killed mid-run"
    run_training(args, extra=("--resume",))

    ref_log, log = read_log(reference), read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 25))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log], "bitwise equal losses after the resume"
    assert [r["grad_norm"] for r in log] == [r["grad_norm"] for r in ref_log]
    assert samples_by_step(run_dir) == samples_by_step(reference)
    seen = [s for rank in samples_by_step(run_dir).values() for batches in rank.values() for b in batches
            for s in b]
    if pack:  # the same windows, and windows they are; each language's clips once per pass over them
        assert windows_by_step(run_dir) == windows_by_step(reference)
        assert max(len(w) for rank in windows_by_step(run_dir).values() for ws in rank.values() for w in ws) > 1
        assert_each_clip_once_per_pass(seen)
        return
    # every training sample exactly once per epoch, over both ranks (epochs complete within 24 steps)
    n_train = json.loads((demo_shards["shards"] / "index.json").read_text())["splits"]["train"]["samples"]
    per_epoch = Counter(epoch for _, epoch in seen)
    complete = [e for e in per_epoch if per_epoch[e] == n_train]
    assert len(complete) >= 3
    for epoch in complete:
        ids = Counter(i for i, e in seen if e == epoch)
        assert len(ids) == n_train and set(ids.values()) == {1}, f"epoch {epoch}"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_no_planted_token_reaches_logs_run_folders_or_output(reference_run):
    run_dir, output = reference_run
    assert HF_SECRET not in output and WANDB_SECRET not in output
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HF_SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path


def test_a_checkpoint_is_complete_or_absent(reference_run):
    """Each kept checkpoint has every rank's files; `latest` names a complete one; no .tmp is left behind."""
    run_dir, _ = reference_run
    folder = run_dir / "checkpoints"
    assert (folder / "latest").read_text() == "step-24"
    for ckpt in (p for p in folder.iterdir() if p.is_dir()):
        assert not ckpt.name.endswith(".tmp")
        names = {p.name for p in ckpt.iterdir()}
        assert {"loop.json", "recipe.yaml", "rank-0.pt", "rank-1.pt"} <= names, ckpt
        assert any(n.startswith("zero_pp_rank_1") for n in names) and any("model_states" in n for n in names)
        loop = json.loads((ckpt / "loop.json").read_text())
        assert loop["world_size"] == 2 and loop["step"] == int(ckpt.name[5:])


@pytest.mark.parametrize("during_eval", [False, True], ids=["between-steps", "during-evaluation"])
def test_sigterm_on_one_rank_saves_at_the_next_step_on_all_ranks_and_exits_0(tiny_model, demo_shards, tmp_path,
                                                                             during_eval):
    run_dir = tmp_path / "run"
    evaluation = ("eval.every_steps=6", "eval.splits=[validation]", "eval.max_new_tokens=64") if during_eval else ()
    args = overrides(tiny_model, demo_shards["shards"], run_dir, "optim.max_steps=14", "checkpoint.every_steps=0",
                     *evaluation)
    with start_training(args) as job:
        wait_for_step(run_dir, 6, job)
        os.kill(job.pids[0 if during_eval else 1], signal.SIGTERM)  # rank 0 evaluates right after step 6
        codes = job.wait(300)
        output = job.output
    assert codes == [0, 0], output[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    stopped = int(latest.split("-")[1])
    assert 6 <= stopped < 14 and f"stopped on request at step {stopped}" in output
    assert {"rank-0.pt", "rank-1.pt", "loop.json"} <= {p.name for p in (run_dir / "checkpoints" / latest).iterdir()}
    if during_eval:
        assert (run_dir / "eval" / "validation-step-6.json").is_file(), "the evaluation under way completes"
    run_training(args, extra=("--resume",))
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, 15))


def rewrite_split(src: Path, dst: Path, split: str, change) -> Path:
    """Copy shards, applying change(key, mel) -> mel to every sample of `split`; index.json stays truthful."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "index.json").read_text())
    for shard in index["splits"][split]["shards"]:
        path = dst / shard["path"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(path, "w") as tar:
            for m, data in members:
                if m.name.endswith(".mel.npy"):
                    mel = change(m.name.split(".")[0], np.load(io.BytesIO(data), allow_pickle=False))
                    buf = io.BytesIO()
                    np.save(buf, mel, allow_pickle=False)
                    data = buf.getvalue()
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        shard.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (dst / "index.json").write_text(json.dumps(index))
    return dst


def test_nonfinite_loss_skips_the_step_on_every_rank_and_names_the_samples(tiny_model, demo_shards, tmp_path):
    poisoned = {"common_voice_fr_1000010", "common_voice_fr_1000033"}
    shards = rewrite_split(demo_shards["shards"], tmp_path / "shards", "train",
                           lambda key, mel: np.full_like(mel, np.nan) if key in poisoned else mel)
    run_dir = tmp_path / "run"
    proc = run_training(overrides(tiny_model, shards, run_dir, "optim.max_steps=12", "checkpoint.every_steps=0"))
    log = read_log(run_dir)
    skipped = [r for r in log if r["skipped_nonfinite_steps"]]
    assert skipped and all(np.isfinite(r["grad_norm"]) for r in log)
    assert all(np.isfinite(r["loss"]) for r in log if r["skipped_nonfinite_steps"] == 0)
    output = proc.output
    assert "non-finite loss, step skipped on every rank" in output
    assert any(p in output for p in poisoned)


def test_nonfinite_losses_in_a_row_stop_the_run_with_a_clear_message(tiny_model, demo_shards, tmp_path):
    shards = rewrite_split(demo_shards["shards"], tmp_path / "shards", "validation",
                           lambda key, mel: np.full_like(mel, np.inf))
    proc = run_training(overrides(tiny_model, shards, tmp_path / "run", "data.train_split=validation",
                                  "optim.max_steps=20", "checkpoint.every_steps=0",
                                  "optim.max_consecutive_nonfinite=2"), check=False, timeout=300)
    assert proc.returncode != 0
    assert "2 steps in a row had a non-finite loss" in proc.output


def corrupt(shards: Path, split: str, n: int, how: str) -> str:
    path = shards / f"{split}/{split}-{n:06d}.tar"
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])
    else:
        path.write_bytes(data[: len(data) // 2])
    return path.name


@pytest.mark.parametrize("how, verify", [("flip", "true"), ("truncate", "false")])
def test_a_bad_shard_is_named_and_skipped(tiny_model, demo_shards, tmp_path, how, verify):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards["shards"], shards)
    name = corrupt(shards, "train", 1, how)
    run_dir = tmp_path / "run"
    proc = run_training(overrides(tiny_model, shards, run_dir, "optim.max_steps=12", "checkpoint.every_steps=0",
                                  f"data.verify_shards={verify}"), timeout=300)
    assert name in proc.output
    assert sum(r["skipped_bad_samples"] for r in read_log(run_dir)) > 0
    assert read_log(run_dir)[-1]["step"] == 12


def test_a_bad_shard_stops_the_run_when_the_recipe_says_so_without_hanging_a_rank(tiny_model, demo_shards,
                                                                                  tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards["shards"], shards)
    name = corrupt(shards, "train", 0, "flip")
    proc = run_training(overrides(tiny_model, shards, tmp_path / "run", "optim.max_steps=12",
                                  "checkpoint.every_steps=0", "data.on_bad_data=stop",
                                  "deepspeed.timeout_minutes=1"), check=False, timeout=240)
    assert 2 in proc.codes, "the rank that read the bad shard leaves at once, with its error"
    assert f"{name} does not match its sha256" in proc.output


@pytest.mark.parametrize("zero_stage, pack", [(2, True), (3, False)], ids=["zero2-packed-two-languages", "zero3"])
def test_a_run_resumes_on_another_number_of_ranks_with_its_state_and_no_sample_repeated_or_skipped(
        tiny_model, demo_shards, tmp_path, zero_stage, pack):
    """2 ranks with 2 loader workers each stop at step 10; the run goes on with 1 rank and 1 worker, re-planning
    the open epochs (with packing, new windows of the clips not yet seen). Also the suite's ZeRO-2/ZeRO-3 training
    on 2 ranks, with a full (gathered) final model."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    args = overrides(tiny_model, demo_shards["shards"], run_dir, f"deepspeed.zero_stage={zero_stage}",
                     "optim.schedule=constant", "optim.warmup_steps=4", "checkpoint.every_steps=0",
                     "logging.sample_ids=true", *(packed(demo_shards) if pack else ()))
    run_training([*args, "optim.max_steps=10", "data.num_workers=2"])
    before = load_file(run_dir / "final" / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")  # ZeRO-3 weights are gathered whole, and trained
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in initial.items()}
    assert any(not torch.equal(before[k], initial[k]) for k in before)
    shutil.rmtree(run_dir / "final")
    # no step to take: the model exported from the 1-rank engine is the one the 2 ranks saved
    proc = run_training([*args, "optim.max_steps=10", "data.num_workers=1"], ranks=1, extra=("--resume",))
    assert "written by 2 ranks, on 1" in " ".join(proc.output.split())  # rich wraps long lines
    after = load_file(run_dir / "final" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    run_training([*args, "optim.max_steps=22", "data.num_workers=1"], ranks=1, extra=("--resume",))

    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 23))
    assert {r["lr"] for r in log[4:]} == {log[9]["lr"]}, "the scheduler goes on past its warmup"
    assert max(r["loss"] for r in log[10:]) < log[0]["loss"] - 1, "the weights go on from where they were"
    seen = [s for rank in samples_by_step(run_dir).values() for batches in rank.values() for b in batches for s in b]
    assert {rank for rank in samples_by_step(run_dir)} == {0, 1}
    if pack:
        assert_each_clip_once_per_pass(seen)
        return
    n_train = json.loads((demo_shards["shards"] / "index.json").read_text())["splits"]["train"]["samples"]
    assert len(seen) == 10 * 8 + 12 * 4  # 2 ranks x 4 clips, then 1 rank x 4 clips, per step
    for epoch in range(len(seen) // n_train):  # every epoch the run finished, across the change
        ids = Counter(i for i, e in seen if e == epoch)
        assert len(ids) == n_train and set(ids.values()) == {1}, f"epoch {epoch}"


def test_a_hung_rank_ends_the_job_with_a_message_in_bounded_time(tiny_model, demo_shards, tmp_path):
    """SIGSTOP on rank 1: rank 0 stops waiting within deepspeed.timeout_minutes (its watchdog, 9 s here) and leaves
    with one line saying what happened and how to continue; its launcher then stops the rest (DeepSpeed's launcher
    ending a job whose rank failed: the bad-shard test above)."""
    run_dir = tmp_path / "run"
    args = overrides(tiny_model, demo_shards["shards"], run_dir, "optim.max_steps=400", "checkpoint.every_steps=0",
                     "deepspeed.timeout_minutes=0.15")
    with start_training(args) as job:
        wait_for_step(run_dir, 3, job)
        os.kill(job.pids[1], signal.SIGSTOP)
        started = time.monotonic()
        codes = job.wait(120)
        elapsed = time.monotonic() - started
        output = job.outputs[0]
    assert codes[0] == 1 and read_log(run_dir)[-1]["step"] < 400
    assert elapsed < 9 + 15, elapsed  # the timeout, and the watchdog's own check every tenth of it
    assert "no answer from another rank within deepspeed.timeout_minutes=0.15" in output, output[-3000:]


def test_a_stale_op_build_lock_is_named_with_its_fix_instead_of_a_silent_wait(tiny_model, demo_shards, tmp_path):
    """A build of DeepSpeed's CPU op killed midway leaves `lock` in its folder, and torch's builder then waits for it
    for ever, printing nothing. An old lock stops the rank at once with one line naming it and the fix."""
    ops = tmp_path / "torch_extensions"
    lock = ops / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    proc = run_training(overrides(tiny_model, demo_shards["shards"], tmp_path / "run", "optim.max_steps=2",
                                  "optim.warmup_steps=1", "checkpoint.every_steps=0"),
                        env={"TORCH_EXTENSIONS_DIR": str(ops)},
                        check=False, timeout=120)
    assert 2 in proc.codes, proc.output[-3000:]
    assert f"{lock} is 60 minutes old" in proc.output and f"rm {lock}" in proc.output


def test_the_cpu_op_is_not_rebuilt_whichever_ninja_is_first_on_path(tmp_path):
    """`make setup` builds DeepSpeed's CPU op once; a rank started from a shell with the virtualenv activated (the
    SLURM script) or not (`launch --run`) must find it built. torch runs the `ninja` on PATH, and the system's and
    pip's ninja hash the same commands differently: each rebuilt what the other built (a minute or more, in the
    first step of every other job)."""
    from launcher.distributed import ops_folder

    ops = tmp_path / "ops"
    shutil.copytree(ops_folder(), ops)  # what `make setup` built (a copy: another test may be using it)
    build = [sys.executable, "-c", "from launcher.distributed import build_cpu_ops; build_cpu_ops()"]
    venv = str(Path(sys.executable).parent)
    subprocess.run(build, env=cpu_env(TORCH_EXTENSIONS_DIR=str(ops), PATH=f"{venv}:{os.environ['PATH']}"),
                   check=True, capture_output=True, timeout=600)
    library = ops / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built = library.stat().st_mtime_ns
    system_path = ":".join(p for p in os.environ["PATH"].split(":") if p != venv)
    subprocess.run(build, env=cpu_env(TORCH_EXTENSIONS_DIR=str(ops), PATH=system_path), check=True,
                   capture_output=True, timeout=600)
    assert library.stat().st_mtime_ns == built, "rebuilt"
