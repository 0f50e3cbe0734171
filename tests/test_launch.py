"""`python -m launcher launch`: hostfile checks, the command line of every mode, .deepspeed_env and its secrets,
the SLURM stop signal, failure advice. Fast: nothing here starts DeepSpeed except the `slow` tests at the end (a
loopback rendezvous, a real training next to a held port 29500)."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import LauncherError
from launcher.launch import (
    DEFAULT_MASTER_PORT,
    FailureContext,
    env_with_file,
    explain_launch_failure,
    free_port,
    installed_runner_flags,
    is_propagated,
    parse_hostfile,
    read_env_file,
    run_command,
    update_env_file,
    world_size,
)
from launcher.launch.advice import recipe_memory_note
from launcher.launch.envfile import load_secrets
from launcher.recipe.load import load_recipe
from launcher.recipe.memory import memory_estimate
from launcher.run_folder import STOP_FILE
from tests.conftest import REPO, cpu_env

RECIPE = str(REPO / "recipes" / "tiny_demo.yaml")
TWO_NODES = str(REPO / "hostfiles" / "two_nodes.txt")
LOOPBACK = str(REPO / "hostfiles" / "loopback_2x1.txt")
SECRETS = {"HF_TOKEN": "hf_secretvalue123", "WANDB_API_KEY": "abc987secret"}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables `launch` propagates (so each test says exactly which are set)."""
    return {**{k: v for k, v in os.environ.items() if not is_propagated(k) and k != "DS_ENV_FILE"}, **extra}


def launch(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "launch", *args], cwd=cwd, capture_output=True,
                          text=True, env=env if env is not None else clean_env(), timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The printed commands parsed back as a shell would, comment lines left out."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def train_start(argv: list[str]) -> int:
    """Where the training part starts: at `train_ds.py`, or at the module after DeepSpeed's `--module` flag."""
    for i, arg in enumerate(argv):
        if arg == "--module":
            return i + 1
        if arg.endswith("train_ds.py"):
            return i
    raise AssertionError(f"neither train_ds.py nor --module in {argv}")


def flag(argv: list[str], name: str) -> str:
    """The value after `name`, looked for only among the launcher's options (before the training script)."""
    launcher_part = argv[:train_start(argv)]
    assert name in launcher_part, f"{name} missing from {argv}"
    return launcher_part[launcher_part.index(name) + 1]


def train_part(argv: list[str]) -> list[str]:
    """`train_ds.py ARGS` or `launcher.train ARGS` (the module that `--module` names)."""
    return argv[train_start(argv):]


# ------------------------------------------------------------------------------------------------- hostfiles
def test_hostfile_parsing_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# two nodes\n\nnode-a slots=8\n   \n  node-b   slots=4   # the small one\n# end\n")
    hosts = parse_hostfile(path)
    assert [(h.name, h.slots, h.line, h.index) for h in hosts] == [("node-a", 8, 3, 0), ("node-b", 4, 5, 1)]
    assert world_size(hosts) == 12


def test_shipped_hostfiles_parse():
    assert [(h.name, h.slots) for h in parse_hostfile(Path(TWO_NODES))] == [("gpu-node-1", 8), ("gpu-node-2", 8)]
    loopback = parse_hostfile(Path(LOOPBACK))
    assert [h.name for h in loopback] == ["localhost", "127.0.0.1"] and world_size(loopback) == 2


@pytest.mark.parametrize("text, line, words", [
    ("node-a slots=8\nnode-b\n", 2, "is not `HOSTNAME slots=GPUS`"),
    ("node-a slots=8\nnode-b slots=8 extra\n", 2, "is not `HOSTNAME slots=GPUS`"),
    ("node-a slots=8\n# c\nnode-a slots=4\n", 3, "already listed on line 1"),
    ("node-a slots=0\n", 1, "at least one slot"),
    ("node-a slots=8\nnode-b slots=-2\n", 2, "at least one slot"),
    ("node-a slots=eight\n", 1, "is not a number"),
])
def test_bad_hostfile_lines_name_the_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "hosts.txt"
    path.write_text(text)
    with pytest.raises(LauncherError) as e:
        parse_hostfile(path)
    assert f"{path}, line {line}:" in str(e.value) and words in str(e.value)


def test_empty_or_missing_hostfile(tmp_path):
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(LauncherError, match="lists no hosts"):
        parse_hostfile(tmp_path / "empty")
    with pytest.raises(LauncherError, match="does not exist"):
        parse_hostfile(tmp_path / "absent")


def test_bad_hostfile_through_the_cli_exits_2_with_file_and_line(tmp_path):
    (tmp_path / "hosts").write_text("node-a slots=8\nnode-a slots=8\n")
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", "hosts", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: hosts, line 2: host 'node-a' is already listed on line 1" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- command lines
def test_single_from_the_repository_root():
    proc = launch("--recipe", "recipes/tiny_demo.yaml", "--num-gpus", "8", "--resume", "--set", "optim.lr=1e-5",
                  "data.batch_size_per_gpu=2", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    [argv] = commands(proc.stdout)
    port = argv[4]
    assert argv == ["deepspeed", "--num_gpus", "8", "--master_port", port, "train_ds.py", "--recipe",
                    "recipes/tiny_demo.yaml", "--resume", "--set", "optim.lr=1e-5", "data.batch_size_per_gpu=2"]
    assert "deepspeed_env" not in proc.stderr  # one node: nothing to propagate


def test_single_picks_a_free_master_port_not_29500():
    """DeepSpeed's default 29500 makes a second job on the machine fail with EADDRINUSE: single mode without
    --master-port picks a port that nothing listens on (the kernel's choice, so it varies between calls)."""
    proc = launch("--recipe", "recipes/tiny_demo.yaml", "--num-gpus", "1", cwd=REPO)
    port = int(flag(commands(proc.stdout)[0], "--master_port"))
    assert port != DEFAULT_MASTER_PORT
    with socket.create_server(("", port)):  # nothing listens there (unless another program took it meanwhile)
        pass


def test_single_elsewhere_runs_the_module_with_the_given_master_port(tmp_path):
    """Without train_ds.py in the current folder, every rank runs `python -u -m launcher.train` (DeepSpeed's
    --module, the runner's last option before the module): no path into a checkout is needed."""
    assert not (tmp_path / "train_ds.py").exists()
    proc = launch("--recipe", RECIPE, "--num-gpus", "2", "--master-port", "29777", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [argv] = commands(proc.stdout)
    assert argv == ["deepspeed", "--num_gpus", "2", "--master_port", "29777", "--module", "launcher.train",
                    "--recipe", RECIPE, "--resume"]
    assert not (tmp_path / ".deepspeed_env").exists()


def test_a_train_ds_py_in_the_current_folder_is_used_as_is(tmp_path):
    (tmp_path / "train_ds.py").write_text("")
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--node-rank", "0", cwd=tmp_path)
    [argv] = commands(proc.stdout)
    assert "--module" not in argv and train_part(argv) == ["train_ds.py", "--recipe", RECIPE]


def test_hostfile_mode_defaults_master_to_the_first_host(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "hostfile", "--hostfile", TWO_NODES, "--set", "optim.max_steps=500",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [argv] = commands(proc.stdout)
    assert argv[0] == "deepspeed" and flag(argv, "--hostfile") == TWO_NODES
    # node 0 is another machine: a port above DeepSpeed's 29500 (two jobs must not share a fixed one)
    assert flag(argv, "--master_addr") == "gpu-node-1" and 29500 < int(flag(argv, "--master_port")) <= 60000
    assert "--no_ssh" not in argv and "--launcher" not in argv and "--log_level" not in argv
    assert train_part(argv)[1:] == ["--recipe", RECIPE, "--set", "optim.max_steps=500"]
    assert "world size 16" in proc.stdout


def test_hostfile_mode_launcher_and_master(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "hostfile", "--hostfile", TWO_NODES, "--launcher", "openmpi",
                  "--master-addr", "10.0.0.1", "--master-port", "6000", cwd=tmp_path)
    [argv] = commands(proc.stdout)
    assert (flag(argv, "--launcher"), flag(argv, "--master_addr"), flag(argv, "--master_port")) == \
        ("openmpi", "10.0.0.1", "6000")


def test_per_node_prints_one_command_per_node(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--master-port", "29555",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    argvs = commands(proc.stdout)
    assert len(argvs) == 2
    for rank, argv in enumerate(argvs):
        assert "--no_ssh" in argv[:argv.index("--node_rank")]
        assert argv[train_start(argv) - 2:train_start(argv) + 1] == ["29555", "--module", "launcher.train"]
        assert flag(argv, "--node_rank") == str(rank)
        assert (flag(argv, "--hostfile"), flag(argv, "--master_addr"), flag(argv, "--master_port")) == \
            (TWO_NODES, "gpu-node-1", "29555")
        assert train_part(argv)[1:] == ["--recipe", RECIPE]
        assert ("--log_level" in argv) == (rank > 0)  # one node's worth of DeepSpeed's launcher lines
    assert "# node 1 of 2 (gpu-node-2" in proc.stdout
    assert "does not read .deepspeed_env" in proc.stderr


def test_per_node_single_rank(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--node-rank", "1", cwd=tmp_path)
    [argv] = commands(proc.stdout)
    assert argv[argv.index("--node_rank"):argv.index("--node_rank") + 2] == ["--node_rank", "1"]
    refused = tmp_path / "refused"
    refused.mkdir()
    bad = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--node-rank", "2", cwd=refused,
                 env=clean_env(**SECRETS))
    assert bad.returncode == 2 and "--node-rank 2 is outside 0..1" in bad.stderr
    assert list(refused.iterdir()) == []  # a refused launch leaves no secrets (nor anything else) on disk


@pytest.mark.parametrize("args, message", [
    (("--mode", "hostfile"), "--mode hostfile needs --hostfile FILE"),
    (("--mode", "hostfile", "--hostfile", TWO_NODES, "--num-gpus", "4"),
     "--num-gpus does not apply to --mode hostfile"),
    (("--mode", "hostfile", "--hostfile", TWO_NODES, "--launcher", "ssh"),
     "--launcher ssh is not one of DeepSpeed's"),
    (("--mode", "single", "--node-rank", "0"), "--node-rank does not apply to --mode single"),
    (("--mode", "slurm", "--num-gpus", "8"), "--mode slurm needs --nodes N"),
    (("--mode", "per-node", "--hostfile", TWO_NODES, "--run"), "--mode per-node --run starts one node"),
    (("--set", "optim.lrx=1"), "optim.lrx: unknown key"),
])
def test_wrong_options_are_explained(tmp_path, args, message):
    proc = launch("--recipe", RECIPE, *args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------ SLURM
def slurm_script(tmp_path: Path, *extra: str, env: dict | None = None) -> str:
    proc = launch("--recipe", RECIPE, "--mode", "slurm", "--nodes", "2", "--num-gpus", "8", *extra, cwd=tmp_path,
                  env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_slurm_script_header_and_srun_line(tmp_path):
    script = slurm_script(tmp_path, "--partition", "gpu", "--time", "24:00:00", "--set", "optim.lr=2e-5")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", f"cd {tmp_path}",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'):
        assert line in script.splitlines() or line in script
    lines = script.splitlines()
    srun_line = next(line for line in lines if line.startswith("srun "))
    srun = shlex.split(srun_line)
    inner = shlex.split(srun[srun.index("-c") + 1], posix=True)
    assert inner[:4] == ["deepspeed", "--hostfile", "$HOSTFILE", "--no_ssh"]
    assert flag(inner, "--node_rank") == "$SLURM_NODEID" and flag(inner, "--master_addr") == "$MASTER_ADDR"
    assert train_part(inner) == ["launcher.train", "--recipe", RECIPE, "--set", "optim.lr=2e-5"]
    assert inner[train_start(inner) - 1] == "--module"  # no train_ds.py in tmp_path


def test_slurm_script_traps_the_early_term_and_waits_for_srun(tmp_path):
    script = slurm_script(tmp_path)
    lines = script.splitlines()
    assert "#SBATCH --signal=B:TERM@300" in lines  # to the batch shell only, 300 s before --time runs out
    assert f"STOP_FILE={Path('runs/demo/run') / STOP_FILE}" in lines  # tiny_demo.yaml's output_dir
    srun_index = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines.index("trap request_stop TERM") < srun_index and lines[srun_index].endswith(" &")
    assert any(line.strip() == 'wait "$SRUN_PID" && status=0 || status=$?' for line in lines[srun_index:])
    assert not any("kill" in line and "SRUN_PID" in line and "-0" not in line for line in lines)  # never forwarded


def test_slurm_sigterm_creates_the_stop_file_and_waits_for_srun(tmp_path):
    """Run the script for real with stand-ins for scontrol and srun, and send SIGTERM to the bash process, as
    `--signal=B:TERM` does: the trap must create <output_dir>/STOP (the override's path, relative to the job's
    folder, quoted), srun must not get the signal, and the script must wait until srun has finished (the ranks
    saving their checkpoint) and exit with srun's status rather than the interrupted wait's 143."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\ntrap 'echo TERM >> srun.log' TERM\necho started >> srun.log\n"
        'for _ in $(seq 300); do [ -e "$EXPECTED_STOP" ] && break; sleep 0.1; done\n'
        '[ -e "$EXPECTED_STOP" ] || exit 3\nsleep 1\necho finished >> srun.log\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(slurm_script(tmp_path, "--set", "output_dir=my runs/it's"))
    stop = tmp_path / "my runs" / "it's" / STOP_FILE
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a", SLURM_JOB_ID="7",
                    EXPECTED_STOP=str(stop))
    proc = subprocess.Popen(["bash", "job.sbatch"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "srun.log"
    deadline = time.monotonic() + 30
    while not (log.is_file() and "started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stop.exists()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stop.is_file() and "SIGTERM: asking the ranks to save a checkpoint and stop" in stderr
    assert log.read_text().splitlines() == ["started", "finished"]  # srun ended first, and never saw the TERM


def test_slurm_script_runs_one_launcher_per_node(tmp_path):
    """Run the script with stand-ins for SLURM's scontrol/srun and for deepspeed (a bash function, which wins
    over the virtualenv's deepspeed on PATH): each node must get its own --node_rank, the shared hostfile made
    from the node list, and the variables of .deepspeed_env that the job's environment lacks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for i in 0 1; do SLURM_NODEID=$i "$@" || exit $?; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    script = slurm_script(tmp_path, env=clean_env(HF_TOKEN=SECRETS["HF_TOKEN"], WANDB_PROJECT="asr"))
    (tmp_path / "job.sbatch").write_text(script)
    fake = '() {  { printf "%s\\n" "$@"; echo "$LAUNCHER_SECRETS"; } > "argv.$SLURM_NODEID"; }'
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="42",
                    WANDB_PROJECT="asr", **{"BASH_FUNC_deepspeed%%": fake})
    proc = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "slurm-42.hostfile").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    for node in (0, 1):
        argv = (tmp_path / f"argv.{node}").read_text().splitlines()
        # from .deepspeed_env (this job's env had none): where the secrets are, which every rank reads at its start
        assert read_env_file(Path(argv[-1])) == {"HF_TOKEN": SECRETS["HF_TOKEN"]}
        argv = argv[:-1]
        assert flag(argv, "--node_rank") == str(node) and "--no_ssh" in argv
        assert flag(argv, "--master_addr") == "gpu-a" and flag(argv, "--hostfile") == "runs/slurm-42.hostfile"
        assert flag(argv, "--master_port") == "20042"  # from the job id: jobs sharing a node do not collide
        assert flag(argv, "--log_level") == ("info" if node == 0 else "warning")


def test_slurm_write_file(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "slurm", "--nodes", "4", "--num-gpus", "8", "--write", "job.sbatch",
                  cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""
    assert "#SBATCH --nodes=4" in (tmp_path / "job.sbatch").read_text() and "sbatch job.sbatch" in proc.stderr


# ----------------------------------------------------------------------------------------- .deepspeed_env, secrets
def test_secrets_go_to_a_file_of_their_own_never_to_a_command_line_or_the_console(tmp_path):
    """DeepSpeed's pdsh runner puts .deepspeed_env's values on its command line (`export NAME=VALUE;`), readable in
    every node's process list for the whole job: secrets are kept out of it, in .deepspeed_secrets (0600), whose
    path .deepspeed_env carries and every rank reads at its start."""
    env = clean_env(**SECRETS, HF_HOME="/data/hf", WANDB_PROJECT="whisper-fr", NCCL_DEBUG="INFO", HOME=str(tmp_path))
    proc = launch("--recipe", RECIPE, "--mode", "hostfile", "--hostfile", TWO_NODES, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    for value in SECRETS.values():
        assert value not in proc.stdout and value not in proc.stderr
    env_file, secrets = tmp_path / ".deepspeed_env", tmp_path / ".deepspeed_secrets"
    assert stat.S_IMODE(env_file.stat().st_mode) == stat.S_IMODE(secrets.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert {"HF_HOME=/data/hf", "WANDB_PROJECT=whisper-fr", "NCCL_DEBUG=INFO", f"LAUNCHER_SECRETS={secrets}",
            "LAUNCHER_NODES=gpu-node-1,gpu-node-2"} <= set(lines)
    assert not any(value in env_file.read_text() for value in SECRETS.values())
    assert read_env_file(secrets) == SECRETS
    assert all("=" in line for line in lines)  # DeepSpeed's runner splits every line on '='
    assert "HF_TOKEN (value hidden)" in proc.stderr and "WANDB_API_KEY (value hidden)" in proc.stderr
    assert "HF_HOME," in proc.stderr and "HF_HOME (value hidden)" not in proc.stderr
    [argv] = commands(proc.stdout)
    assert not any(value in " ".join(argv) for value in SECRETS.values())
    environ = {"LAUNCHER_SECRETS": str(secrets), "HF_TOKEN": "the node's own"}
    assert load_secrets(environ) == ["WANDB_API_KEY"]  # what a rank lacks, from the file; its own value kept
    assert environ["HF_TOKEN"] == "the node's own" and environ["WANDB_API_KEY"] == SECRETS["WANDB_API_KEY"]
    secrets.unlink()
    with pytest.raises(LauncherError, match="which this node does not have"):
        load_secrets({"LAUNCHER_SECRETS": str(secrets)})


@pytest.mark.parametrize("mode", [("per-node", "--hostfile", TWO_NODES), ("slurm", "--nodes", "2", "--num-gpus", "8")])
def test_secrets_never_printed_in_other_modes(tmp_path, mode):
    proc = launch("--recipe", RECIPE, "--mode", *mode, cwd=tmp_path, env=clean_env(**SECRETS))
    assert proc.returncode == 0, proc.stderr
    assert not any(v in proc.stdout + proc.stderr for v in SECRETS.values())
    assert read_env_file(tmp_path / ".deepspeed_secrets") == SECRETS


def test_env_file_keeps_other_entries_and_skips_values_deepspeed_would_mangle(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("NCCL_SOCKET_IFNAME=eth0\n\nHF_HOME=/old\n")
    path.chmod(0o644)
    report = update_env_file({"HF_HOME": "/new", "WANDB_API_KEY": "pa$$word", "HF_TOKEN": "tok_value_9",
                              "HOME": "/root", "PYTHONPATH": "/extra"}, path)
    assert read_env_file(path) == {"NCCL_SOCKET_IFNAME": "eth0", "HF_HOME": "/new",
                                   "PYTHONPATH": f"{tmp_path.resolve()}:/extra",
                                   "LAUNCHER_SECRETS": str((tmp_path / ".deepspeed_secrets").resolve())}
    assert read_env_file(tmp_path / ".deepspeed_secrets") == {"HF_TOKEN": "tok_value_9"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = report.describe()
    assert "NCCL_SOCKET_IFNAME (kept from the file)" in text and "not written: WANDB_API_KEY" in text
    assert "pa$$word" not in text and "tok_value_9" not in text


def test_broken_env_file_is_reported_with_its_line(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("HF_HOME=/x\n# a comment\n")
    with pytest.raises(LauncherError, match=r"\.deepspeed_env, line 2: not `NAME=VALUE`"):
        update_env_file({"HF_TOKEN": "x"}, path)


def test_nothing_to_propagate_writes_nothing(tmp_path):
    report = update_env_file({"HOME": "/root", "PATH": "/bin"}, tmp_path / ".deepspeed_env")
    assert not report.written and not (tmp_path / ".deepspeed_env").exists()
    assert "not written" in report.describe()


def test_env_with_file_fills_only_what_is_missing():
    assert env_with_file({"HF_HOME": "/here"}, {"HF_HOME": "/there", "HF_TOKEN": "t"}) == \
        {"HF_HOME": "/here", "HF_TOKEN": "t"}


def test_installed_deepspeed_runner_has_the_flags_the_commands_use():
    flags = installed_runner_flags()
    assert flags is not None, "DeepSpeed is a dependency of this project"
    assert {"--no_ssh", "--node_rank", "--master_addr", "--master_port", "--hostfile", "--num_gpus", "--launcher",
            "--log_level", "--module"} <= flags


# ------------------------------------------------------------------------------------------------------- --run
def fake_deepspeed(tmp_path: Path, body: str) -> dict[str, str]:
    """A `deepspeed` program first on PATH (what --run executes), standing in for DeepSpeed's launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture(scope="module")
def runnable(tiny_model, demo_shards) -> tuple[str, ...]:
    """--set values that make the demo recipe pass `launch --run`'s preflight (a model and shards that exist)."""
    return ("--set", f"model.name_or_path={tiny_model}", f"data.shards={demo_shards['shards']}")


def test_run_stops_on_a_failed_preflight_before_starting_anything(tmp_path):
    env = fake_deepspeed(tmp_path, "echo STARTED")
    proc = launch("--recipe", RECIPE, "--num-gpus", "1", "--run", "--set", f"model.name_or_path={tmp_path / 'nope'}",
                  cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "STARTED" not in proc.stdout
    assert "FAIL" in proc.stderr and "the preflight failed" in proc.stderr and "Traceback" not in proc.stderr


def test_per_node_run_adds_the_env_file_variables_the_node_lacks(tmp_path, runnable):
    (tmp_path / ".deepspeed_env").write_text("HF_TOKEN=from_node0\nHF_HOME=/shared/hf\n")
    env = fake_deepspeed(tmp_path, 'echo "ARGS $*"; echo "GOT ${LAUNCHER_SECRETS:-none} ${HF_HOME:-none} '
                                   '${HF_TOKEN:-none}"')
    env["HF_HOME"] = "/local/hf"
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", LOOPBACK, "--node-rank", "1", "--run",
                  *runnable, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.splitlines()[0].removeprefix("ARGS "))
    assert flag(argv, "--node_rank") == "1" and flag(argv, "--master_addr") == "localhost"
    # missing ones added, the node's own kept; the secret (an older .deepspeed_env's) moved to the secrets file,
    # which the ranks read, and never in the launcher's environment or output
    assert f"GOT {tmp_path / '.deepspeed_secrets'} /local/hf none" in proc.stdout
    assert read_env_file(tmp_path / ".deepspeed_secrets") == {"HF_TOKEN": "from_node0"}
    assert "from_node0" not in proc.stderr + proc.stdout


def test_run_explains_a_known_failure(tmp_path, runnable):
    env = fake_deepspeed(tmp_path, "echo 'torch.distributed.DistNetworkError: ... port: 29123, useIpv6: false, "
                                   "code: -98, name: EADDRINUSE, message: address already in use' >&2; exit 1")
    proc = launch("--recipe", RECIPE, "--num-gpus", "1", "--master-port", "29123", "--run", *runnable, cwd=tmp_path,
                  env=env)
    assert proc.returncode == 1
    assert "EADDRINUSE" in proc.stderr  # the child's own output is passed through
    assert "launch failed (exit 1): the master port is already in use" in proc.stderr
    assert "ss -ltnp | grep 29123" in proc.stderr


def test_run_with_a_held_master_port_ends_with_one_line_of_port_advice(tmp_path, runnable):
    """A stand-in for DeepSpeed binds the --master_port it is given, as rank 0's TCPStore does first, while this
    test holds that port: the real `Address already in use` error, then one line naming the port."""
    (tmp_path / "bind.py").write_text("import socket, sys\n"
                                      "port = int(sys.argv[sys.argv.index('--master_port') + 1])\n"
                                      "socket.create_server(('', port))\n")
    env = fake_deepspeed(tmp_path, f'exec "{sys.executable}" "{tmp_path / "bind.py"}" "$@"')
    with socket.create_server(("", 0)) as held:
        port = held.getsockname()[1]
        proc = launch("--recipe", RECIPE, "--num-gpus", "1", "--master-port", str(port), "--run", *runnable,
                      cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "OSError: [Errno 98] Address already in use" in proc.stderr
    [advice] = [line for line in proc.stderr.splitlines() if line.startswith("launch failed")]
    assert advice.startswith("launch failed (exit 1): the master port is already in use")
    assert advice.endswith(f"`ss -ltnp | grep {port}`")  # the port from the plan: the error text has none


def test_run_command_streams_output_and_returns_the_exit_code():
    out, err = io.StringIO(), io.StringIO()
    code = "import sys; print('hello'); sys.stderr.write('ModuleNotFoundError: No module named deepspeed\\n'); " \
           "sys.exit(3)"
    assert run_command([sys.executable, "-c", code], os.environ, out, err) == 3
    assert out.getvalue() == "hello\n"
    assert "No module named deepspeed" in err.getvalue() and "activate the same virtualenv" in err.getvalue()


# ------------------------------------------------------------------------------------------------------ advice
@pytest.mark.parametrize("text, words", [
    ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
     "port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use",
     "grep 29500"),
    ("OSError: [Errno 98] Address already in use", "--master-port"),
    ("bash: pdsh: command not found", "apt-get install pdsh"),
    ("RuntimeError: launcher 'pdsh' not installed.", "apt-get install pdsh"),
    ("RuntimeError: launcher 'openmpi' not installed.", "mpirun"),
    ("ModuleNotFoundError: No module named 'deepspeed'", "same virtualenv"),
    ("[W socket.cpp:752] [c10d] The client socket cannot be initialized to connect to [node-a]:29500 "
     "(errno: 111 - Connection refused).", "could not reach the master"),
    ("torch.distributed.DistStoreError: Timed out after 1801 seconds waiting for clients. 1/2 clients joined.",
     "could not reach the master"),
    ("RuntimeError: Using hostfile at h but host=node-a was not reachable via ssh.", "passwordless ssh"),
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
     "NCCL_DEBUG=INFO"),
    ("RuntimeError: Unable to proceed, no GPU resources available", "DS_ACCELERATOR=cpu"),
    # a hung or dead rank: NCCL's watchdog (logged by ProcessGroupNCCL, which the NCCL advice also matches), gloo's
    ("[rank1]:[E626 06:24:44.903881913 ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog caught collective operation "
     "timeout: WorkNCCL(SeqNum=808, OpType=ALLREDUCE, NumelIn=9801523, NumelOut=9801523, Timeout(ms)=1800000) ran "
     "for 1800020 milliseconds before timing out.\n[rank1]:[E626 06:24:44.906457629 ProcessGroupNCCL.cpp:1785] "
     "[PG ID 0 PG GUID 0(default_pg) Rank 1] Exception (either an error or timeout) detected by watchdog at work: 808",
     "deepspeed.timeout_minutes"),
    ("[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
     "out waiting 1800000ms for recv operation to complete", "continue from the last checkpoint with --resume"),
    # a rank killed by SIGKILL (the OOM killer): DeepSpeed's launch.py, torchrun
    ("[2025-06-26 06:24:44,903] [ERROR] [launch.py:259:sigkill_handler] ['/venv/bin/python', '-u', '-m', "
     "'launcher.train', '--local_rank=3', '--recipe', 'recipes/large_fr.yaml'] exits with return code = -9",
     "killed by the operating system (exit -9)"),
    ("  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 4242",
     "most likely out of memory"),
])
def test_explain_launch_failure(text, words):
    advice = explain_launch_failure(1, f"some log line\n{text}\nmore\n")
    assert advice is not None and words in advice and "\n" not in advice


def test_a_rank_killed_for_memory_gets_the_estimate_and_what_to_lower():
    """Once a rank is SIGKILLed the others fail too (NCCL errors, closed connections); the kill is the cause."""
    output = ("[rank0]: RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was "
              "a network error\n[ERROR] [launch.py:259:sigkill_handler] ['python', '-u', 'train_ds.py', "
              "'--local_rank=5'] exits with return code = -9\n")
    estimate = "this recipe needs about 71.3 GiB per GPU at world size 8"
    advice = explain_launch_failure(247, output, FailureContext(memory=estimate))
    assert advice is not None and "\n" not in advice
    assert advice.startswith("a rank was killed by the operating system (exit -9), most likely out of memory")
    assert estimate in advice
    for knob in ("data.batch_size_per_gpu", "optim.grad_accum", "model.gradient_checkpointing",
                 "deepspeed.zero_stage=3", "deepspeed.offload_optimizer"):
        assert knob in advice
    assert explain_launch_failure(-signal.SIGKILL, "") == explain_launch_failure(1, output)  # killed itself


def test_the_memory_estimate_is_computed_only_for_a_memory_kill():
    calls = []

    def estimate() -> str | None:
        calls.append(1)
        return None  # e.g. the model's config was not reachable: the advice goes without numbers

    context = FailureContext(master_port=29611, memory=estimate)
    port_advice = explain_launch_failure(1, "OSError: [Errno 98] Address already in use", context)
    assert port_advice is not None and port_advice.endswith("grep 29611`") and calls == []
    advice = explain_launch_failure(247, "exits with return code = -9", context)
    assert calls == [1] and advice == explain_launch_failure(247, "exits with return code = -9")


def test_recipe_memory_note_is_the_validate_estimate_or_none(tmp_path):
    config = {"model_type": "whisper", "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "num_mel_bins": 80}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(Path(RECIPE), [f"model.name_or_path={tmp_path}"])
    note = recipe_memory_note(recipe, 4)
    total = memory_estimate(recipe, config, 4)["total_gib"]
    assert note is not None and note.startswith(f"this recipe needs about {total:.1f} GiB per GPU at world size 4 (")
    missing = load_recipe(Path(RECIPE), [f"model.name_or_path={tmp_path / 'absent'}"])
    assert recipe_memory_note(missing, 4) is None


def test_explain_launch_failure_stays_quiet_otherwise():
    assert explain_launch_failure(0, "EADDRINUSE") is None
    assert explain_launch_failure(1, "ValueError: my own bug") is None
    assert explain_launch_failure(1, "") is None


# ------------------------------------------------------------------------------------------ real rendezvous
@pytest.mark.slow
def test_printed_per_node_commands_rendezvous_on_loopback(tmp_path):
    """The two commands printed for hostfiles/loopback_2x1.txt, run side by side with DeepSpeed on the CPU
    (a gloo all-reduce module standing in for launcher.train, started through the printed `--module`):
    `localhost` and `127.0.0.1` are two nodes of one world."""
    (tmp_path / "allreduce.py").write_text("import sys, torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t)\n"
                      "print(f'rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item():.0f} {sys.argv[1:]}')\n"
                      "dist.destroy_process_group()\n")
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", LOOPBACK, "--master-port", str(free_port()),
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    procs = []
    for argv in commands(proc.stdout):
        assert argv[train_start(argv) - 1:train_start(argv) + 1] == ["--module", "launcher.train"]
        argv[train_start(argv)] = "allreduce"  # `python -u -m allreduce`, found in the current folder
        argv[0] = str(Path(sys.executable).parent / "deepspeed")
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=cpu_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    for rank, output in enumerate(outputs):
        assert f"rank {rank} of 2 sum 3 ['--local_rank=0', '--recipe', {RECIPE!r}]" in output
