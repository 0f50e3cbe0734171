"""Multi-node for real, on one machine: "nodes" are loopback addresses (127.0.0.1, 127.0.0.2), reached through a real
sshd and pdsh (`launch --mode hostfile`), scheduled by a real Slurm controller with one slurmd per node (the script of
`launch --mode slurm`), or started per node (`deepspeed --no_ssh --node_rank I`, what `--mode per-node` prints) and
killed. The services come from `launcher.testing.services`, each in a temporary folder on free ports; a test that
cannot have them is skipped with the reason (LAUNCHER_REQUIRE_SERVICES=1, set by CI, makes that a failure)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher.launch.commands import TRAIN_MODULE, per_node_command, train_args
from launcher.launch.envfile import read_env_file
from launcher.testing.services import Munge, Slurm, Sshd, missing
from tests.conftest import REPO, cpu_env, deepspeed_cmd, free_port, read_log, run_training
from tests.conftest import run_overrides as base_overrides

pytestmark = pytest.mark.slow
RECIPE = str(REPO / "recipes" / "tiny_demo.yaml")
NODES = "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
SECRET = "hf_PLANTEDmultinode0123456789"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # no virtualenv activated


def need(*programs: str) -> None:
    absent = missing(*programs)
    if absent:
        reason = f"not installed here: {', '.join(absent)} (`make setup` installs them as root)"
        if os.environ.get("LAUNCHER_REQUIRE_SERVICES"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    need("sshd", "ssh", "ssh-keygen", "pdsh")
    with Sshd(tmp_path_factory.mktemp("services")) as server:
        yield server


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
    folder = tmp_path_factory.mktemp("services")
    with Munge(folder) as munge, Slurm(folder, munge, nodes=2) as cluster:
        yield cluster


def overrides(tiny_model, demo_shards, run_dir: Path, *extra: str) -> list[str]:
    return base_overrides(tiny_model, demo_shards["shards"], run_dir, "eval.test_at_end=false",
                          "logging.every_steps=1", "optim.warmup_steps=1", *extra)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


def job_processes(*sessions: int) -> list[psutil.Process]:
    """Every live process of these sessions (a node's launcher started in a session of its own)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sessions and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


class CommandLines:
    """Samples every process's command line while a job runs, keeping those that hold `needle`."""

    def __init__(self, needle: str):
        self.needle, self.found, self._stop = needle, set(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for p in psutil.process_iter():
                try:
                    line = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if self.needle in line:
                    self.found.add(line[:200])

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_hostfile_mode_over_pdsh_trains_two_nodes_as_one_node_of_two_ranks_and_keeps_the_secret_in_its_file(
        sshd, tiny_model, demo_shards, tmp_path):
    """`launch --mode hostfile --run` from a shell without the virtualenv on PATH, HF_TOKEN set only there: DeepSpeed's
    pdsh runner starts node 0 and node 1 over ssh, 1 rank each. Same losses as one node with 2 ranks; the secret is
    in .deepspeed_secrets (0600) and nowhere else: not in the console, the run folder, .deepspeed_env, nor any
    process's command line while the job runs; one node's worth of DeepSpeed's launcher lines."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "hosts").write_text(NODES)
    args = overrides(tiny_model, demo_shards, work / "run", "optim.max_steps=6", "checkpoint.every_steps=0")
    env = sshd.env(cpu_env(PATH=SYSTEM_PATH, HF_TOKEN=SECRET))
    env.pop("VIRTUAL_ENV", None)
    with CommandLines(SECRET) as seen:
        proc = subprocess.run([sys.executable, "-m", "launcher", "launch", "--recipe", RECIPE, "--mode", "hostfile",
                               "--hostfile", "hosts", "--run", "--set", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    reference = run_training(overrides(tiny_model, demo_shards, tmp_path / "one-node", "optim.max_steps=6",
                                       "checkpoint.every_steps=0"))
    assert reference.returncode == 0
    assert losses(work / "run") == losses(tmp_path / "one-node"), "2 nodes x 1 rank = 1 node x 2 ranks, bitwise"
    ds_config = json.loads((work / "run" / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 8  # 2 nodes x 1 rank x 4
    # several nodes (DeepSpeed's launcher says each node's ranks in LOCAL_SIZE): buckets sized for the network
    assert ds_config["zero_optimization"]["reduce_bucket_size"] == 200_000_000

    secrets = work / ".deepspeed_secrets"
    assert read_env_file(secrets) == {"HF_TOKEN": SECRET} and stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert SECRET not in output and not seen.found, seen.found
    for path in [work / ".deepspeed_env", *(p for p in (work / "run").rglob("*") if p.is_file())]:
        assert SECRET.encode() not in path.read_bytes(), path
    node1 = [line for line in output.splitlines() if line.startswith("127.0.0.2: ") and "[INFO]" in line]
    assert node1 == [] and any(line.startswith("127.0.0.1: ") and "[INFO]" in line for line in output.splitlines())


def start_node(node: int, cwd: Path, port: int, args: list[str]) -> subprocess.Popen:
    """The command `launch --mode per-node` prints for node `node`, started in a session of its own (a "node")."""
    train = train_args(RECIPE, args, entry=["--module", TRAIN_MODULE])
    cmd = deepspeed_cmd(*per_node_command(train, str(cwd / "hosts"), node, "127.0.0.1", port)[1:])
    (cwd / "hosts").write_text(NODES)
    return subprocess.Popen(cmd, cwd=cwd, env=cpu_env(LAUNCHER_NODES="127.0.0.1,127.0.0.2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def last_step(run_dir: Path) -> int:
    """The last step train_log.jsonl records (0 before the first, or while a line is being written)."""
    try:
        return read_log(run_dir)[-1]["step"]
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        assert all(p.poll() is None for p in procs), "a node ended early"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("what", ["whole-node", "launcher-only"])
def test_a_node_that_dies_ends_the_job_with_one_line_and_resume_continues_on_one_node(tiny_model, demo_shards,
                                                                                        tmp_path, what):
    """2 nodes x 1 rank, each node started by its own DeepSpeed launcher. Mid-run, node 1 is SIGKILLed whole (its
    launcher, rank and loader workers), or only its launcher (the rank, once orphaned, must not train on): node 0's
    rank stops with one line naming the rank and node that went away and the command that resumes, no process of
    the job is left on either node, the last complete checkpoint is intact, and --resume on one node continues."""
    run_dir, port = tmp_path / "run", free_port()
    common = overrides(tiny_model, demo_shards, run_dir, "checkpoint.every_steps=3", "data.num_workers=1")
    nodes = [start_node(n, tmp_path, port, [*common, "optim.max_steps=400"]) for n in (0, 1)]
    try:
        wait_for_step(run_dir, 5, nodes)
        launcher = psutil.Process(nodes[1].pid)
        if what == "whole-node":
            os.killpg(nodes[1].pid, signal.SIGKILL)
        else:  # DeepSpeed's runner and its launch.py, not the rank they started
            rank = next(p for p in launcher.children(recursive=True) if "launcher.train" in " ".join(p.cmdline())
                        and "deepspeed.launcher.launch" not in " ".join(p.cmdline()))
            for p in [launcher, *launcher.children(recursive=True)]:
                if p.pid != rank.pid and p.ppid() != rank.pid:
                    p.kill()
        killed = time.monotonic()
        output = nodes[0].communicate(timeout=120)[0]
        ended = time.monotonic() - killed
        nodes[1].wait(10)
        deadline = time.monotonic() + 15
        while job_processes(nodes[0].pid, nodes[1].pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [" ".join(p.cmdline())[:120] for p in job_processes(nodes[0].pid, nodes[1].pid)]
    finally:
        for p in job_processes(nodes[0].pid, nodes[1].pid):
            p.kill()
    print(f"{what}: node 0 ended {ended:.1f} s after node 1 was killed")  # the figure for the note
    assert nodes[0].returncode != 0 and ended < 60, (ended, output[-3000:])
    [line] = [line for line in output.splitlines() if "went away" in line]
    assert "rank 1 on node 1 (127.0.0.2) went away" in line and "--resume" in line, line
    assert left == [], f"processes of the job left running: {left}"
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert {"loop.json", "rank-0.pt", "rank-1.pt"} <= {p.name for p in (run_dir / "checkpoints" / latest).iterdir()}
    stopped = int(latest.split("-")[1])
    resumed = run_training([*common, f"optim.max_steps={stopped + 3}"], ranks=1, extra=("--resume",))
    assert "written by 2 ranks, on 1" in " ".join(resumed.output.split())
    assert read_log(run_dir)[-1]["step"] == stopped + 3


def test_a_node_running_other_code_or_another_run_folder_is_stopped_before_the_first_step_by_name(
        tiny_model, demo_shards, tmp_path):
    """Node 1 starts from another checkout (one file of the launcher changed) in another folder, so the relative
    output_dir is another run folder there: every rank stops before the first step, and the report names node 1."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    for node in (node0, node1):
        shutil.copytree(REPO / "launcher", node / "launcher", ignore=shutil.ignore_patterns("__pycache__"))
    with open(node1 / "launcher" / "errors.py", "a") as f:
        f.write("\n# a change only node 1 has\n")
    port = free_port()
    args = [*overrides(tiny_model, demo_shards, Path("run"), "optim.max_steps=4", "checkpoint.every_steps=0")]
    nodes = [start_node(n, cwd, port, args) for n, cwd in ((0, node0), (1, node1))]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [2, 2], outputs[0][-3000:]
    assert all("node 1" not in o for o in outputs[0].splitlines() if "[INFO]" in o and "launch.py" in o), \
        "node 1's launcher logs at warning level"
    report = outputs[0]
    folder = next(line for line in report.splitlines() if " run-folder " in line)
    same = next(line for line in report.splitlines() if " same-code " in line)
    assert folder.startswith("FAIL") and "node 1 (127.0.0.2)" in folder, report[-3000:]
    assert same.startswith("FAIL") and "code differs" in same and "node 1 (127.0.0.2)" in same, report[-3000:]
    assert not (node0 / "run" / "train_log.jsonl").exists(), "stopped before the first step"


def test_slurm_job_on_a_cpu_partition_stops_on_term_and_resumes_to_the_uninterrupted_losses(
        slurm, tiny_model, demo_shards, tmp_path):
    """The script of `launch --mode slurm --nodes 2 --cpu-ranks 1` on a real Slurm cluster of two slurmd: `scancel
    --batch --signal=TERM` (what --signal=B:TERM does before the time limit) makes every rank save and the job exit 0;
    the script written with --resume continues, and the losses equal an uninterrupted run's."""
    work = tmp_path / "work"
    work.mkdir()
    # a constant learning rate: the interrupted job's max_steps (400) and the resumed one's must not change it
    args = overrides(tiny_model, demo_shards, work / "run", "optim.max_steps=400", "checkpoint.every_steps=0",
                     "optim.schedule=constant")
    env = slurm.env(cpu_env())

    def script(name: str, *extra: str) -> Path:
        proc = subprocess.run([sys.executable, "-m", "launcher", "launch", "--recipe", RECIPE, "--mode", "slurm",
                               "--nodes", "2", "--cpu-ranks", "1", "--partition", "cpu", "--write", name, *extra,
                               "--set", *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return work / name

    def submit(path: Path) -> str:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], cwd=work, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def finished(job: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
            state = next((w.split("=", 1)[1] for w in info.split() if w.startswith("JobState=")), "")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} still running after {timeout} s:\n{info}")

    first = submit(script("job.sbatch"))
    deadline = time.monotonic() + 300
    while last_step(work / "run") < 4:
        assert time.monotonic() < deadline, [p.read_text()[-3000:] for p in work.glob("slurm-*.out")]
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", first], env=env, check=True, timeout=30)
    info = finished(first)
    out = next(work.glob(f"slurm-*-{first}.out")).read_text()
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + out[-3000:]
    stopped = int((work / "run" / "checkpoints" / "latest").read_text().split("-")[1])
    assert "stopped on request at step" in out and 4 <= stopped < 400

    end = stopped + 4
    args[args.index("optim.max_steps=400")] = f"optim.max_steps={end}"
    info = finished(submit(script("resume.sbatch", "--resume")))
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    reference = run_training(overrides(tiny_model, demo_shards, tmp_path / "uninterrupted", f"optim.max_steps={end}",
                                       "checkpoint.every_steps=0", "optim.schedule=constant"))
    assert reference.returncode == 0
    assert [r["step"] for r in read_log(work / "run")] == list(range(1, end + 1))
    assert losses(work / "run") == losses(tmp_path / "uninterrupted"), "bitwise equal after the resubmission"
