"""No orphans: a command that is killed or stopped takes every process it started with it.

- `launcher shard` SIGKILLed mid-run: its ProcessPoolExecutor workers, their forkserver and the multiprocessing
  resource tracker (about 150 MB each) must all exit within seconds (launcher/shards/build.py's _Pool).
- `launcher launch --run` (started outside the checkout, DeepSpeed's default port held: it picks a free one) stopped
  with SIGTERM to its process group (a terminal, `kill -- -PGID`, a container stop): the ranks must save, and the
  command must not return before its last descendant has ended, none of them left running with parent 1
  meanwhile.
- CPU ranks: DeepSpeed's shared-memory all-reduce files in /dev/shm (66 MB a rank, RAM) must not outlive the job.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.launch import DEFAULT_MASTER_PORT
from launcher.testing.commands import run_ranks
from tests.conftest import REPO, cpu_env

pytestmark = pytest.mark.slow


def describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (parent {p.ppid()}, {p.status()}): {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            pass
    return out


def alive(procs) -> list[psutil.Process]:
    live = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.Error:
            pass
    return live


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


def session_members(sid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except (OSError, psutil.Error):
            pass
    return members


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_a_sigkilled_shard_run_leaves_no_worker_forkserver_or_resource_tracker(bigger_corpus, tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "shard", "--lang", "fr", "--source",
                             f"cv:{bigger_corpus}", "--out", str(out), "--workers", "2", "--shard-size", "0.3"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    main = psutil.Process(proc.pid)
    descendants: list[psutil.Process] = []
    try:
        # working: the pool's workers exist (children of the forkserver, so grandchildren here) and a shard is
        # being written
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            descendants = main.children(recursive=True)
            workers = [p for p in descendants if p.ppid() != proc.pid]
            if len(workers) >= 2 and list(out.glob("*/*.tmp")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        descendants = main.children(recursive=True)
        assert len(descendants) >= 4, describe(descendants)  # resource tracker, forkserver, 2 workers

        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        proc.wait()
        killed = time.monotonic()
        while alive(descendants) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        left = alive(descendants)
        assert not left, (f"still alive {time.monotonic() - killed:.1f} s after the main process was SIGKILLed:\n"
                          + "\n".join(describe(left)))
    finally:
        kill_all(alive(descendants) + alive(session_members(proc.pid)))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_run_picks_a_free_port_trains_through_the_module_and_sigterm_to_its_group_leaves_no_process(
        tiny_model, demo_shards, tmp_path):
    """`launch --run` (one node, 2 ranks) started outside the checkout while DeepSpeed's default port 29500 is held
    (a second job on the machine): it picks a free port and every rank runs `python -u -m launcher.train`. Then
    SIGTERM to its process group (a terminal, `kill -- -PGID`, a container stop): the ranks save, and the command
    does not return before its last descendant has ended, none of them left running with parent 1 meanwhile."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "launcher", "launch", "--recipe", str(REPO / "recipes" / "tiny_demo.yaml"),
           "--num-gpus", "2", "--run", "--set", f"model.name_or_path={tiny_model}",
           f"data.shards={demo_shards['shards']}", f"output_dir={run_dir}", "optim.max_steps=400",
           "eval.every_steps=0", "checkpoint.keep_best=0", "eval.test_at_end=false", "logging.every_steps=1"]
    try:
        held = socket.create_server(("", DEFAULT_MASTER_PORT))
    except OSError:  # someone already holds it: the situation this test is about
        held = None
    proc = subprocess.Popen(cmd, cwd=elsewhere, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: proc.stdout.read1(65536), b"")),
                              daemon=True)
    reader.start()
    wrapper = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}

    def collect() -> None:
        """Every process the command started, even one in a session of its own or reparented since."""
        roots = [wrapper, *seen.values()] if proc.poll() is None else list(seen.values())
        for p in [*roots, *session_members(proc.pid)]:
            try:
                for q in [p, *p.children(recursive=True)]:
                    if q.pid != proc.pid:
                        seen.setdefault(q.pid, q)
            except psutil.Error:
                pass

    try:
        log = run_dir / "train_log.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, b"".join(output).decode(errors="replace")[-3000:]
            collect()
            if log.is_file() and any(json.loads(x)["step"] >= 2 for x in log.read_text().splitlines() if x.strip()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no step 2 within 300 s")

        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        orphans: list[str] = []
        left_when_done: list[str] = []
        while time.monotonic() - signalled < 120:
            collect()
            live = alive(seen.values())
            if proc.poll() is not None:
                left_when_done = describe(live)
                break
            family = {proc.pid} | {p.pid for p in live}
            orphans = describe([p for p in live if _ppid(p) not in (*family, None)])  # None: just ended
            if orphans:
                break
            time.sleep(0.1)
        waited = time.monotonic() - signalled
        assert not orphans, f"{waited:.1f} s after SIGTERM, reparented while the command waits:\n" + "\n".join(orphans)
        assert proc.poll() is not None, "the command was still running 120 s after SIGTERM"
        assert not left_when_done, (f"the command returned ({proc.returncode}) {waited:.1f} s after SIGTERM, "
                                    "leaving:\n" + "\n".join(left_when_done))
        reader.join(timeout=10)
        text = b"".join(output).decode(errors="replace")
        assert "stopped on request at step" in text, text[-3000:]
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert (run_dir / "checkpoints" / latest).is_dir()
        assert not (run_dir / "STOP").exists(), "the stop request is cleared once acted on"
        running = shlex.split(next(line for line in text.splitlines() if line.startswith("running: deepspeed ")))
        port = int(running[running.index("--master_port") + 1])
        assert port != DEFAULT_MASTER_PORT and running[running.index("--module") + 1] == "launcher.train"
    finally:
        if held is not None:
            held.close()
        collect()
        kill_all(alive(seen.values()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cpu_ranks_leave_nothing_in_dev_shm(tmp_path):
    """DeepSpeed never removes its per-rank /dev/shm buffers: before the fix every 2-rank CPU run left 132 MB of RAM
    behind (14 GB after a day of tests). Their names are gone right after the process group starts, and the
    shared-memory all-reduce still works."""
    port = run_ranks("tests/shm_probe.py", [str(tmp_path)], logs=tmp_path / "logs").port
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["shm_op"] for r in ranks), "DeepSpeed's shared-memory all-reduce was not in use: nothing to check"
    assert [r["all_reduce"] for r in ranks] == [[2.0] * 4] * 2
    assert [r["files"] for r in ranks] == [[], []]
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert left == []
