"""The command lines of every mode, and the SLURM script (checked against DeepSpeed 0.19.8's launcher/runner.py).

- single:   `deepspeed --num_gpus N --master_port P TRAIN` on this machine.
- hostfile: `deepspeed --hostfile H --master_addr A --master_port P TRAIN`: DeepSpeed starts every node itself
  through pdsh (ssh) or an MPI launcher (`--launcher`).
- per-node: `deepspeed --hostfile H --no_ssh --node_rank I --master_addr A --master_port P TRAIN`, run by you
  (or your scheduler) on node I; no ssh between nodes.
- slurm:    an sbatch script whose `srun` starts that per-node command once per node.

TRAIN is `train_ds.py ARGS` or `--module launcher.train ARGS` (see `train_entry`): `--module` is an option of
DeepSpeed's runner, so it goes last among the runner's options, right before the module name, in every mode.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT; the multi-node modes' default
# deepspeed/launcher/constants.py; "ssh" is not one of them: pdsh is DeepSpeed's ssh launcher.
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")
LAUNCHER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpirun",
                     "slurm": "srun"}
TRAIN_SCRIPT = "train_ds.py"
TRAIN_MODULE = "launcher.train"
STOP_NOTICE_SECONDS = 300  # SLURM signals the batch shell this long before --time runs out


def free_port(host: str = "") -> int:
    """A TCP port that nothing listens on right now (the kernel picks it), for a rendezvous on one machine.

    A fixed port (DeepSpeed's 29500) makes a second job on the same machine fail with EADDRINUSE. Bound on every
    address by default, as rank 0's TCPStore binds it. Free when chosen, not reserved: another program could
    take it before the job binds it.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of DeepSpeed ranks on the CPU (the demo, the test suite, CPU benchmarks): DeepSpeed's CPU
    accelerator (gloo), one intra-op thread per rank (ranks share the cores), no tokenizer threads."""
    return {**(os.environ if base is None else base), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


def deepspeed_runner() -> str:
    """DeepSpeed's `deepspeed` command installed beside this Python (found without activating its virtualenv)."""
    return str(Path(sys.executable).parent / "deepspeed")


def train_entry(cwd: Path | None = None) -> list[str]:
    """What every rank runs: `train_ds.py` where the current directory has it (the repository root, as the
    README shows), else `--module launcher.train` (DeepSpeed then runs `python -u -m launcher.train`).

    The module form works from any folder where the package is installed, with no path to a checkout.
    """
    cwd = Path.cwd() if cwd is None else cwd
    return [TRAIN_SCRIPT] if (cwd / TRAIN_SCRIPT).is_file() else ["--module", TRAIN_MODULE]


def train_args(recipe: str, overrides: Sequence[str] = (), resume: bool = False, entry: Sequence[str] = (TRAIN_SCRIPT,)
               ) -> list[str]:
    """`ENTRY --recipe R [--resume] [--set k=v ...]`: the end of every command line."""
    args = [*entry, "--recipe", recipe]
    if resume:
        args.append("--resume")
    if overrides:
        args += ["--set", *overrides]
    return args


def single_command(train: Sequence[str], num_gpus: int, master_port: int) -> list[str]:
    """One node: DeepSpeed starts `num_gpus` ranks here (rendezvous on 127.0.0.1:master_port)."""
    return ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(master_port), *train]


def hostfile_command(train: Sequence[str], hostfile: str, master_addr: str, master_port: int,
                     launcher: str | None = None) -> list[str]:
    """All nodes from here: DeepSpeed reaches them through pdsh/ssh (or `launcher`). It exports .deepspeed_env's
    variables on the pdsh command line, which therefore holds no secret (`envfile`)."""
    cmd = ["deepspeed", "--hostfile", hostfile, "--master_addr", master_addr, "--master_port", str(master_port)]
    if launcher is not None:
        cmd += ["--launcher", launcher]
    return cmd + list(train)


def per_node_command(train: Sequence[str], hostfile: str, node_rank: int, master_addr: str, master_port: int
                     ) -> list[str]:
    """Node `node_rank` only: `--no_ssh` makes DeepSpeed start this node's ranks and nothing else. The nodes after the
    first log at warning level: one node's worth of DeepSpeed's launcher lines is enough."""
    quiet = ["--log_level", "warning"] if node_rank else []
    return ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank), *quiet,
            "--master_addr", master_addr, "--master_port", str(master_port), *train]


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script needs; everything else comes from SLURM's variables at run time."""

    nodes: int
    ranks_per_node: int  # GPUs per node, or ranks per node on a CPU partition (`cpu`)
    stop_path: str  # the recipe's output_dir / STOP_FILE, relative to workdir or absolute
    master_port: int | None = None  # None: derived from the job id, so jobs sharing a node do not collide
    cpu: bool = False  # a CPU partition: no GPU asked for, DeepSpeed's CPU accelerator
    job_name: str = "whisper"
    partition: str | None = None
    time: str | None = None
    workdir: str = "."
    venv: str | None = None
    env_file: str = ".deepspeed_env"


def slurm_script(train: Sequence[str], job: SlurmJob) -> str:
    """An sbatch script: one DeepSpeed launcher per node through srun, no ssh between nodes.

    Node 0 is the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, which is also the order of
    SLURM_NODEID, so `--node_rank $SLURM_NODEID` and the generated hostfile agree on who hosts rank 0.
    Before the time limit SLURM sends TERM to the batch shell only (`B:`): DeepSpeed's launcher, if signalled,
    gives its ranks 30 s before killing them (`terminate_process_tree`), too short for a ZeRO-3 checkpoint of a
    large model; the script's trap creates the stop file instead, and the ranks stop themselves.
    """
    header = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
              *([] if job.cpu else [f"--gpus-per-node={job.ranks_per_node}"]), "--output=slurm-%x-%j.out",
              f"--signal=B:TERM@{STOP_NOTICE_SECONDS}"]
    header += [f"--partition={job.partition}"] * (job.partition is not None)
    header += [f"--time={job.time}"] * (job.time is not None)
    env = shlex.quote(job.env_file)
    # node 0 logs DeepSpeed's launcher lines at info level, the others at warning: one node's worth of them
    per_node = ('deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" '
                '--log_level "$([ "$SLURM_NODEID" = 0 ] && echo info || echo warning)" '
                '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ' + shlex.join(train))
    port = (f"MASTER_PORT={job.master_port}  # change it if another job on the first node holds this port"
            if job.master_port else
            "MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))  # from the job id: jobs sharing a node do not collide")
    venv = [f"source {shlex.quote(str(Path(job.venv) / 'bin' / 'activate'))}  # the virtualenv this was written "
            f"from"] if job.venv else []
    lines = [
        "#!/bin/bash",
        "# Written by `python -m launcher launch --mode slurm`: srun starts one DeepSpeed launcher per node",
        f"# (--no_ssh, no pdsh), each starting {job.ranks_per_node} ranks"
        f"{' on its CPUs' if job.cpu else ''}; submit with `sbatch THIS_FILE`.",
        *(f"#SBATCH {option}" for option in header),
        "set -e",
        f"cd {shlex.quote(job.workdir)}",
        *venv,
        "set -u",
        "",
        f"# sbatch exports the submitting shell's environment; {env} (written by `launch`, mode 0600)",
        "# adds the HF_*, WANDB_*, NCCL_* variables it lacks, e.g. when submitted from another shell.",
        f"if [ -f {env} ]; then",
        "  while IFS= read -r line || [ -n \"$line\" ]; do",
        "    name=${line%%=*}",
        "    [ -n \"${!name+x}\" ] || export \"$name=${line#*=}\"",
        f"  done < {env}",
        "fi",
        "",
        "# node 0 = first host of the allocation = SLURM_NODEID 0: it hosts rank 0 and the rendezvous",
        f"RANKS_PER_NODE={job.ranks_per_node}",
        *(["export DS_ACCELERATOR=cpu  # a CPU partition: DeepSpeed's CPU accelerator (gloo)"] if job.cpu else []),
        "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)",
        port,
        "HOSTFILE=runs/slurm-$SLURM_JOB_ID.hostfile",
        "mkdir -p runs",
        "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | while read -r host; do",
        "  echo \"$host slots=$RANKS_PER_NODE\"",
        "done > \"$HOSTFILE\"",
        "if [ -z \"$MASTER_ADDR\" ] || [ ! -s \"$HOSTFILE\" ]; then",
        "  echo \"no hosts from scontrol show hostnames '$SLURM_JOB_NODELIST'\" >&2; exit 1",
        "fi",
        "export MASTER_ADDR MASTER_PORT HOSTFILE",
        "echo \"master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE:\"; cat \"$HOSTFILE\"",
        "",
        f"# {STOP_NOTICE_SECONDS} s before --time runs out, SLURM sends TERM to this shell only (--signal=B:...;",
        "# `scancel --batch --signal=TERM JOBID` does the same by hand). It is not passed on to DeepSpeed, which",
        "# would kill its ranks 30 s later: the trap creates the stop file, and every rank saves a checkpoint at",
        "# its next step and exits 0. Continue with --resume.",
        f"STOP_FILE={shlex.quote(job.stop_path)}",
        "request_stop() {",
        "  echo \"SIGTERM: asking the ranks to save a checkpoint and stop ($STOP_FILE)\" >&2",
        "  mkdir -p \"$(dirname \"$STOP_FILE\")\" && touch \"$STOP_FILE\" || echo \"cannot create $STOP_FILE\" >&2",
        "}",
        "trap request_stop TERM",
        "",
        "# bash runs a trap only after the foreground command returns: srun runs in the background, and a signal",
        "# ends `wait` early, so wait again until srun has really ended (the checkpoint is being written).",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)} &",
        "SRUN_PID=$!",
        "while :; do",
        "  wait \"$SRUN_PID\" && status=0 || status=$?",
        "  kill -0 \"$SRUN_PID\" 2>/dev/null || break",
        "done",
        "exit \"$status\"",
    ]
    return "\n".join(lines) + "\n"
