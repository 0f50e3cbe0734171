"""`python -m launcher launch`: hostfile checks, the command line of every mode, .deepspeed_env and its secrets,
failure advice. Fast: nothing here starts DeepSpeed except the one `slow` loopback rendezvous at the end."""

from __future__ import annotations

import io
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import LauncherError
from launcher.launch import (
    env_with_file,
    explain_launch_failure,
    installed_runner_flags,
    is_propagated,
    parse_hostfile,
    read_env_file,
    run_command,
    update_env_file,
    world_size,
)
from tests.conftest import REPO, cpu_env, free_port

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


def flag(argv: list[str], name: str) -> str:
    """The value after `name`, looked for only among the launcher's options (before the training script)."""
    launcher_part = argv[:next(i for i, a in enumerate(argv) if a.endswith("train_ds.py"))]
    assert name in launcher_part, f"{name} missing from {argv}"
    return launcher_part[launcher_part.index(name) + 1]


def train_part(argv: list[str]) -> list[str]:
    return argv[next(i for i, a in enumerate(argv) if a.endswith("train_ds.py")):]


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
    assert argv == ["deepspeed", "--num_gpus", "8", "train_ds.py", "--recipe", "recipes/tiny_demo.yaml", "--resume",
                    "--set", "optim.lr=1e-5", "data.batch_size_per_gpu=2"]
    assert "deepspeed_env" not in proc.stderr  # one node: nothing to propagate


def test_single_elsewhere_uses_the_absolute_script_and_master_port(tmp_path):
    proc = launch("--recipe", RECIPE, "--num-gpus", "2", "--master-port", "29777", cwd=tmp_path)
    [argv] = commands(proc.stdout)
    assert argv[:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29777"]
    assert argv[5] == str(REPO / "train_ds.py") and Path(argv[5]).is_file()
    assert not (tmp_path / ".deepspeed_env").exists()


def test_hostfile_mode_defaults_master_to_the_first_host(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "hostfile", "--hostfile", TWO_NODES, "--set", "optim.max_steps=500",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [argv] = commands(proc.stdout)
    assert argv[0] == "deepspeed" and flag(argv, "--hostfile") == TWO_NODES
    assert flag(argv, "--master_addr") == "gpu-node-1" and flag(argv, "--master_port") == "29500"
    assert "--no_ssh" not in argv and "--launcher" not in argv and "--log_level" not in argv  # no secret here
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
        assert flag(argv, "--node_rank") == str(rank)
        assert (flag(argv, "--hostfile"), flag(argv, "--master_addr"), flag(argv, "--master_port")) == \
            (TWO_NODES, "gpu-node-1", "29555")
        assert train_part(argv)[1:] == ["--recipe", RECIPE]
    assert "# node 1 of 2 (gpu-node-2" in proc.stdout
    assert "does not read .deepspeed_env" in proc.stderr


def test_per_node_single_rank(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--node-rank", "1", cwd=tmp_path)
    [argv] = commands(proc.stdout)
    assert argv[argv.index("--node_rank"):argv.index("--node_rank") + 2] == ["--node_rank", "1"]
    bad = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", TWO_NODES, "--node-rank", "2", cwd=tmp_path,
                 env=clean_env(**SECRETS))
    assert bad.returncode == 2 and "--node-rank 2 is outside 0..1" in bad.stderr
    assert not (tmp_path / ".deepspeed_env").exists()  # a refused launch leaves no secrets on disk


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
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    inner = shlex.split(srun[srun.index("-c") + 1], posix=True)
    assert inner[:4] == ["deepspeed", "--hostfile", "$HOSTFILE", "--no_ssh"]
    assert flag(inner, "--node_rank") == "$SLURM_NODEID" and flag(inner, "--master_addr") == "$MASTER_ADDR"
    assert train_part(inner)[1:] == ["--recipe", RECIPE, "--set", "optim.lr=2e-5"]


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
    fake = '() {  { printf "%s\\n" "$@"; echo "HF_TOKEN=${HF_TOKEN:-}"; } > "argv.$SLURM_NODEID"; }'
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="42",
                    WANDB_PROJECT="asr", **{"BASH_FUNC_deepspeed%%": fake})
    proc = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "slurm-42.hostfile").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    for node in (0, 1):
        argv = (tmp_path / f"argv.{node}").read_text().splitlines()
        assert argv[-1] == f"HF_TOKEN={SECRETS['HF_TOKEN']}"  # from .deepspeed_env: this job's env had none
        argv = argv[:-1]
        assert flag(argv, "--node_rank") == str(node) and "--no_ssh" in argv
        assert flag(argv, "--master_addr") == "gpu-a" and flag(argv, "--hostfile") == "runs/slurm-42.hostfile"


def test_slurm_write_file(tmp_path):
    proc = launch("--recipe", RECIPE, "--mode", "slurm", "--nodes", "4", "--num-gpus", "8", "--write", "job.sbatch",
                  cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""
    assert "#SBATCH --nodes=4" in (tmp_path / "job.sbatch").read_text() and "sbatch job.sbatch" in proc.stderr


# ----------------------------------------------------------------------------------------- .deepspeed_env, secrets
def test_secrets_are_written_to_deepspeed_env_but_never_printed(tmp_path):
    env = clean_env(**SECRETS, HF_HOME="/data/hf", WANDB_PROJECT="whisper-fr", NCCL_DEBUG="INFO", HOME=str(tmp_path))
    proc = launch("--recipe", RECIPE, "--mode", "hostfile", "--hostfile", TWO_NODES, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    for value in SECRETS.values():
        assert value not in proc.stdout and value not in proc.stderr
    env_file = tmp_path / ".deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert {"HF_TOKEN=hf_secretvalue123", "WANDB_API_KEY=abc987secret", "HF_HOME=/data/hf",
            "WANDB_PROJECT=whisper-fr", "NCCL_DEBUG=INFO"} <= set(lines)
    assert all("=" in line for line in lines)  # DeepSpeed's runner splits every line on '='
    assert "HF_TOKEN (value hidden)" in proc.stderr and "WANDB_API_KEY (value hidden)" in proc.stderr
    assert "HF_HOME," in proc.stderr and "HF_HOME (value hidden)" not in proc.stderr
    [argv] = commands(proc.stdout)
    assert flag(argv, "--log_level") == "warning"  # DeepSpeed would log the pdsh line holding the exports


@pytest.mark.parametrize("mode", [("per-node", "--hostfile", TWO_NODES), ("slurm", "--nodes", "2", "--num-gpus", "8")])
def test_secrets_never_printed_in_other_modes(tmp_path, mode):
    proc = launch("--recipe", RECIPE, "--mode", *mode, cwd=tmp_path, env=clean_env(**SECRETS))
    assert proc.returncode == 0, proc.stderr
    assert not any(v in proc.stdout + proc.stderr for v in SECRETS.values())
    assert set(read_env_file(tmp_path / ".deepspeed_env").items()) >= set(SECRETS.items())


def test_env_file_keeps_other_entries_and_skips_values_deepspeed_would_mangle(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("NCCL_SOCKET_IFNAME=eth0\n\nHF_HOME=/old\n")
    path.chmod(0o644)
    report = update_env_file({"HF_HOME": "/new", "WANDB_API_KEY": "pa$$word", "HF_TOKEN": "tok_value_9",
                              "HOME": "/root", "PYTHONPATH": "/extra"}, path)
    assert read_env_file(path) == {"NCCL_SOCKET_IFNAME": "eth0", "HF_HOME": "/new", "HF_TOKEN": "tok_value_9",
                                   "PYTHONPATH": f"{tmp_path.resolve()}:/extra"}
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
            "--log_level"} <= flags


# ------------------------------------------------------------------------------------------------------- --run
def fake_deepspeed(tmp_path: Path, body: str) -> dict[str, str]:
    """A `deepspeed` program first on PATH (what --run executes), standing in for DeepSpeed's launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "deepspeed").chmod(0o755)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_per_node_run_adds_the_env_file_variables_the_node_lacks(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("HF_TOKEN=from_node0\nHF_HOME=/shared/hf\n")
    env = fake_deepspeed(tmp_path, 'echo "ARGS $*"; echo "GOT ${HF_TOKEN:-none} ${HF_HOME:-none}"')
    env["HF_HOME"] = "/local/hf"
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", LOOPBACK, "--node-rank", "1", "--run",
                  cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.splitlines()[0].removeprefix("ARGS "))
    assert flag(argv, "--node_rank") == "1" and flag(argv, "--master_addr") == "localhost"
    assert "GOT from_node0 /local/hf" in proc.stdout  # missing ones added, the node's own kept
    assert "from_node0" not in proc.stderr


def test_run_explains_a_known_failure(tmp_path):
    env = fake_deepspeed(tmp_path, "echo 'torch.distributed.DistNetworkError: ... port: 29123, useIpv6: false, "
                                   "code: -98, name: EADDRINUSE, message: address already in use' >&2; exit 1")
    proc = launch("--recipe", RECIPE, "--num-gpus", "1", "--master-port", "29123", "--run", cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert "EADDRINUSE" in proc.stderr  # the child's own output is passed through
    assert "launch failed (exit 1): the master port is already in use" in proc.stderr
    assert "ss -ltnp | grep 29123" in proc.stderr


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
])
def test_explain_launch_failure(text, words):
    advice = explain_launch_failure(1, f"some log line\n{text}\nmore\n")
    assert advice is not None and words in advice and "\n" not in advice


def test_explain_launch_failure_stays_quiet_otherwise():
    assert explain_launch_failure(0, "EADDRINUSE") is None
    assert explain_launch_failure(1, "ValueError: my own bug") is None
    assert explain_launch_failure(1, "") is None


# ------------------------------------------------------------------------------------------ real rendezvous
@pytest.mark.slow
def test_printed_per_node_commands_rendezvous_on_loopback(tmp_path):
    """The two commands printed for hostfiles/loopback_2x1.txt, run side by side with DeepSpeed on the CPU
    (a gloo all-reduce standing in for train_ds.py): `localhost` and `127.0.0.1` are two nodes of one world."""
    script = tmp_path / "allreduce.py"
    script.write_text("import sys, torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t)\n"
                      "print(f'rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item():.0f} {sys.argv[1:]}')\n"
                      "dist.destroy_process_group()\n")
    proc = launch("--recipe", RECIPE, "--mode", "per-node", "--hostfile", LOOPBACK, "--master-port", str(free_port()),
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    procs = []
    for argv in commands(proc.stdout):
        argv[argv.index(str(REPO / "train_ds.py"))] = str(script)
        argv[0] = str(Path(sys.executable).parent / "deepspeed")
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=cpu_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    for rank, output in enumerate(outputs):
        assert f"rank {rank} of 2 sum 3 ['--local_rank=0', '--recipe', {RECIPE!r}]" in output
