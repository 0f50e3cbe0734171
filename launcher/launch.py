"""`python -m launcher launch`: the DeepSpeed command lines for one node, many nodes, or SLURM.

Why this exists: starting `train_ds.py` on N nodes goes wrong in a few well-known ways (a hostfile typo found
only by pdsh, HF_TOKEN missing on the other nodes, a port still held by yesterday's job). This module builds
the exact commands from a checked hostfile, prints them (copy-pasteable, quoted with `shlex.join`) or runs
them, and turns the usual rendezvous failures into one line of advice.

Modes (checked against DeepSpeed 0.19.8's `deepspeed/launcher/runner.py`):

- `single`:   `deepspeed --num_gpus N train_ds.py ...` on this machine.
- `hostfile`: `deepspeed --hostfile H --master_addr A --master_port P train_ds.py ...`: DeepSpeed starts every
  node itself through pdsh (ssh) or an MPI launcher (`--launcher`).
- `per-node`: one command per node, `deepspeed --hostfile H --no_ssh --node_rank I --master_addr A ...`, run by
  you (or your scheduler) on node I; no ssh between nodes.
- `slurm`:    an sbatch script whose `srun` starts that per-node command once per node, with
  `--node_rank $SLURM_NODEID` and a hostfile made from `$SLURM_JOB_NODELIST`.

Environment: DeepSpeed's multi-node runner exports to every node the variables named in `.deepspeed_env`
(`NAME=VALUE` lines, read from `~` and then from the current directory; the file name can be changed with
`DS_ENV_FILE`). `launch` writes the HF_*, WANDB_*, NCCL_*, TRANSFORMERS_* and PYTHONPATH variables of the
current environment there, secrets (HF_TOKEN, WANDB_API_KEY) included, because writing the value into that
file is how DeepSpeed propagates it: the file gets mode 0600, and only the variable names are ever printed.
DeepSpeed reads the file only when it starts the nodes itself (pdsh/MPI); with `--no_ssh` it does not, so the
SLURM script and `per-node --run` load from it the variables a node's environment lacks.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from launcher.errors import LauncherError

MODES = ("single", "hostfile", "per-node", "slurm")
DEFAULT_MASTER_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT
# deepspeed/launcher/constants.py; "ssh" is not one of them: pdsh is DeepSpeed's ssh launcher.
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")
LAUNCHER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpirun",
                     "slurm": "srun"}
TRAIN_SCRIPT = "train_ds.py"
REPO = Path(__file__).resolve().parent.parent

PROPAGATED_PREFIXES = ("HF_", "HUGGING_FACE_", "WANDB_", "NCCL_", "TORCH_NCCL_", "TRANSFORMERS_")
PROPAGATED_NAMES = ("PYTHONPATH",)
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
# DeepSpeed's pdsh runner double-quotes a value with any other character, so the remote shell would expand
# `$`, backquotes and backslashes, and a `"` would end the quoting; it also strips surrounding whitespace.
_MANGLED_BY_DEEPSPEED = re.compile(r'["$`\\\n\r]')
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\S+)\s*(?:#.*)?")


# --------------------------------------------------------------------------------------------------- hostfiles
@dataclass(frozen=True)
class Host:
    """One line of a hostfile: DeepSpeed numbers the nodes in file order, so `index` is the node rank."""

    name: str
    slots: int
    line: int
    index: int


def parse_hostfile(path: Path) -> list[Host]:
    """Read `host slots=N` lines ('#' comments, blank lines allowed).

    Parsed here rather than left to DeepSpeed so that a typo fails before any node starts, with the file and
    line, and so that the per-node commands can be numbered and the world size printed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LauncherError(f"hostfile {path} does not exist: give an existing file with --hostfile "
                            f"(format: one `HOSTNAME slots=GPUS` line per node, see hostfiles/two_nodes.txt)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LauncherError(f"hostfile {path} cannot be read: {e}") from None
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        host = _parse_host_line(path, number, line, seen)
        seen[host.name] = number
        hosts.append(Host(host.name, host.slots, number, len(hosts)))
    if not hosts:
        raise LauncherError(f"hostfile {path} lists no hosts: add one `HOSTNAME slots=GPUS` line per node")
    return hosts


def _parse_host_line(path: Path, number: int, line: str, seen: Mapping[str, int]) -> Host:
    where = f"{path}, line {number}"
    match = _HOST_LINE.fullmatch(line)
    if not match:
        raise LauncherError(f"{where}: {line!r} is not `HOSTNAME slots=GPUS` (e.g. `node-a slots=8`; '#' starts "
                            f"a comment)")
    name, slots_text = match["host"], match["slots"]
    if name in seen:
        raise LauncherError(f"{where}: host {name!r} is already listed on line {seen[name]}: DeepSpeed refuses "
                            f"duplicate hosts; give each node once with all its GPUs in slots=")
    if not re.fullmatch(r"[+-]?\d+", slots_text):
        raise LauncherError(f"{where}: slots={slots_text} is not a number: write the GPUs this node uses, e.g. "
                            f"slots=8")
    slots = int(slots_text)
    if slots <= 0:
        raise LauncherError(f"{where}: slots={slots} for host {name!r}: a node needs at least one slot (GPU); "
                            f"remove the line to leave the node out")
    return Host(name, slots, number, -1)


def world_size(hosts: Sequence[Host]) -> int:
    """Ranks in the job: DeepSpeed starts one process per slot of every host."""
    return sum(h.slots for h in hosts)


# ---------------------------------------------------------------------------------------------------- commands
def train_args(recipe: str, overrides: Sequence[str] = (), resume: bool = False, script: str = TRAIN_SCRIPT
               ) -> list[str]:
    """`train_ds.py --recipe R [--resume] [--set k=v ...]`: what every rank runs."""
    args = [script, "--recipe", recipe]
    if resume:
        args.append("--resume")
    if overrides:
        args += ["--set", *overrides]
    return args


def default_train_script(cwd: Path | None = None) -> str:
    """`train_ds.py` when run from the repository root (as the README shows), else its absolute path."""
    cwd = Path.cwd() if cwd is None else cwd
    local = cwd / TRAIN_SCRIPT
    if local.is_file() and local.resolve() == (REPO / TRAIN_SCRIPT).resolve():
        return TRAIN_SCRIPT
    return str(REPO / TRAIN_SCRIPT)


def single_command(train: Sequence[str], num_gpus: int, master_port: int | None = None) -> list[str]:
    """One node: DeepSpeed starts `num_gpus` ranks here (rendezvous on 127.0.0.1)."""
    cmd = ["deepspeed", "--num_gpus", str(num_gpus)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return cmd + list(train)


def hostfile_command(train: Sequence[str], hostfile: str, master_addr: str, master_port: int,
                     launcher: str | None = None, hide_exports: bool = False) -> list[str]:
    """All nodes from here: DeepSpeed reaches them through pdsh/ssh (or `launcher`).

    `hide_exports` adds `--log_level warning`: at info level DeepSpeed logs the whole pdsh command line, which
    carries `export NAME=VALUE` for every variable of .deepspeed_env, secrets included.
    """
    cmd = ["deepspeed", "--hostfile", hostfile, "--master_addr", master_addr, "--master_port", str(master_port)]
    if launcher is not None:
        cmd += ["--launcher", launcher]
    if hide_exports:
        cmd += ["--log_level", "warning"]
    return cmd + list(train)


def per_node_command(train: Sequence[str], hostfile: str, node_rank: int, master_addr: str, master_port: int
                     ) -> list[str]:
    """Node `node_rank` only: `--no_ssh` makes DeepSpeed start this node's ranks and nothing else."""
    return ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", master_addr, "--master_port", str(master_port), *train]


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch header needs; everything else comes from SLURM's variables at run time."""

    nodes: int
    gpus_per_node: int
    master_port: int = DEFAULT_MASTER_PORT
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
    """
    header = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={job.gpus_per_node}", "--output=slurm-%x-%j.out"]
    header += [f"--partition={job.partition}"] * (job.partition is not None)
    header += [f"--time={job.time}"] * (job.time is not None)
    env = shlex.quote(job.env_file)
    per_node = ('deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" '
                '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ' + shlex.join(train))
    venv = [f"source {shlex.quote(str(Path(job.venv) / 'bin' / 'activate'))}  # the virtualenv this was written "
            f"from"] if job.venv else []
    lines = [
        "#!/bin/bash",
        "# Written by `python -m launcher launch --mode slurm`: srun starts one DeepSpeed launcher per node",
        f"# (--no_ssh, no pdsh), each starting {job.gpus_per_node} ranks; submit with `sbatch THIS_FILE`.",
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
        f"GPUS_PER_NODE={job.gpus_per_node}",
        "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)",
        f"MASTER_PORT={job.master_port}  # change it if another job on the first node holds this port",
        "HOSTFILE=runs/slurm-$SLURM_JOB_ID.hostfile",
        "mkdir -p runs",
        "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | while read -r host; do",
        "  echo \"$host slots=$GPUS_PER_NODE\"",
        "done > \"$HOSTFILE\"",
        "if [ -z \"$MASTER_ADDR\" ] || [ ! -s \"$HOSTFILE\" ]; then",
        "  echo \"no hosts from scontrol show hostnames '$SLURM_JOB_NODELIST'\" >&2; exit 1",
        "fi",
        "export MASTER_ADDR MASTER_PORT HOSTFILE",
        "echo \"master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE:\"; cat \"$HOSTFILE\"",
        "",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- .deepspeed_env
def is_secret(name: str) -> bool:
    """Names whose values must never be printed (HF_TOKEN, WANDB_API_KEY, ...)."""
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def is_propagated(name: str) -> bool:
    """The variables the other nodes need to see what this shell sees (hub cache/token, wandb, NCCL tuning)."""
    return name in PROPAGATED_NAMES or name.startswith(PROPAGATED_PREFIXES)


def env_file_path(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """Where DeepSpeed's runner looks last (and so what wins): `$DS_ENV_FILE` or `.deepspeed_env`, in the cwd."""
    environ = os.environ if environ is None else environ
    return (Path.cwd() if cwd is None else cwd) / environ.get("DS_ENV_FILE", ".deepspeed_env")


@dataclass
class EnvFileReport:
    """What `update_env_file` did, by variable name only (values never leave the file)."""

    path: Path
    values: dict[str, str] = field(default_factory=dict)
    from_env: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    written: bool = False

    def describe(self) -> str:
        if not self.written:
            return (f"{self.path.name} not written: no {', '.join(p + '*' for p in PROPAGATED_PREFIXES)} or "
                    f"PYTHONPATH variable in this environment")
        names = [_label(n) for n in self.from_env] + [f"{_label(n)} (kept from the file)" for n in self.kept]
        text = f"wrote {self.path}: {', '.join(names) or 'nothing'}"
        if self.skipped:
            text += (f"\nnot written: {', '.join(self.skipped)}: DeepSpeed's runner would mangle the value (it has "
                     f"one of \" $ ` \\, a line break or surrounding spaces); set it on every node yourself")
        return text

    def write(self) -> None:
        """Write the file, unless there is nothing to write and no file to update."""
        if self.values or self.path.is_file():
            write_env_file(self.path, self.values)
            self.written = True

    @property
    def has_secret(self) -> bool:
        return any(is_secret(n) for n in self.values)


def _label(name: str) -> str:
    return f"{name} (value hidden)" if is_secret(name) else name


def propagated_env(environ: Mapping[str, str], cwd: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The variables to write, and the names left out because DeepSpeed could not carry their value intact.

    PYTHONPATH gets the working directory in front, as DeepSpeed's runner does for its own export: the file's
    value replaces that export, and must not drop the repository from the path.
    """
    values: dict[str, str] = {}
    skipped: list[str] = []
    for name in sorted(environ):
        if not is_propagated(name):
            continue
        value = environ[name]
        if name == "PYTHONPATH":
            here = str((Path.cwd() if cwd is None else cwd).resolve())
            value = value if value.split(":")[0] == here else f"{here}:{value}" if value else here
        if _MANGLED_BY_DEEPSPEED.search(value) or value != value.strip():
            skipped.append(name)
        else:
            values[name] = value
    return values, skipped


def read_env_file(path: Path) -> dict[str, str]:
    """An existing .deepspeed_env, checked the way DeepSpeed will read it (every line `NAME=VALUE`)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue  # DeepSpeed would fail on a blank line; the rewrite below drops it
        name, sep, value = line.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name.strip()):
            raise LauncherError(f"{path}, line {number}: not `NAME=VALUE`; DeepSpeed's runner reads every line as "
                                f"one (no comments): fix or delete that line, or delete the file to start afresh")
        values[name.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """Replace the file atomically, readable by its owner only (it holds tokens)."""
    fd, tmp = tempfile.mkstemp(prefix=".deepspeed_env.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{name}={value}\n" for name, value in values.items())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_env_file(environ: Mapping[str, str], path: Path) -> EnvFileReport:
    """Write the propagated variables of `environ` into `path`, keeping the other entries already there.

    Existing entries are kept (a hand-added NCCL_SOCKET_IFNAME, or node 0's HF_TOKEN on a node whose shell lacks
    it); the environment's values win. Delete the file to drop a stale entry.
    """
    report = plan_env_file(environ, path)
    report.write()
    return report


def plan_env_file(environ: Mapping[str, str], path: Path) -> EnvFileReport:
    """What `update_env_file` will write, computed without writing (so a later error leaves no file behind)."""
    existing = read_env_file(path) if path.is_file() else {}
    values, skipped = propagated_env(environ, path.parent)
    return EnvFileReport(path, {**existing, **values}, sorted(values), sorted(set(existing) - set(values)), skipped)


def env_with_file(environ: Mapping[str, str], file_values: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus the file's variables it lacks: what the slurm script does, for `per-node --run`.

    With --no_ssh DeepSpeed's runner never reads .deepspeed_env (only its pdsh/MPI branch does), so a node
    started per node gets the file's variables only this way.
    """
    return {**{k: v for k, v in file_values.items() if k not in environ}, **environ}


# ------------------------------------------------------------------------------------------------ failures
_ADVICE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"EADDRINUSE|address already in use", re.I),
     "the master port is already in use on the first node (another or a leftover job): pick a free one with "
     "--master-port, or find the holder with `ss -ltnp | grep PORT`"),
    (re.compile(r"pdsh: (command )?not found|launcher 'pdsh' not installed|No such file or directory: 'pdsh'", re.I),
     "pdsh is not installed on this node: `apt-get install pdsh` (plus passwordless ssh to every host), or use "
     "--mode per-node / --mode slurm, which need neither"),
    (re.compile(r"launcher '(\w+)' not installed", re.I),
     "the --launcher program is not installed on this node (mpirun for openmpi/mpich/impi/mvapich, srun for "
     "slurm): install it, or use --mode per-node"),
    (re.compile(r"No module named '?deepspeed'?|deepspeed: (command )?not found", re.I),
     "DeepSpeed is missing where the job ran: activate the same virtualenv on every node (same path, e.g. in "
     "~/.bashrc for pdsh) or `pip install -c constraints.txt -e .` there"),
    (re.compile(r"No module named '?launcher'?", re.I),
     "the nodes cannot import this project: start from the repository root, at the same path on every node "
     "(shared filesystem or identical checkout)"),
    (re.compile(r"was not reachable via ssh|Permission denied \(publickey|Host key verification failed", re.I),
     "ssh from this node to a host of the hostfile fails: set up passwordless ssh (`ssh HOST hostname` must work "
     "without a prompt), or use --mode per-node / --mode slurm, which need no ssh"),
    (re.compile(r"Could not resolve hostname|Name or service not known|Temporary failure in name resolution", re.I),
     "a host name does not resolve: use names or IP addresses that every node can resolve, in the hostfile and "
     "for --master-addr"),
    (re.compile(r"Connection refused|connect\(\) timed out|timed out after|Timed out (after|waiting)|"
                r"DistNetworkError|failed to connect|No route to host|Socket Timeout", re.I),
     "this node could not reach the master: --master-addr must be node 0's address as seen from every node "
     "(not 127.0.0.1 across machines), the port must be open in the firewall, and node 0 must be started"),
    (re.compile(r"NCCL (error|WARN)|nccl\w*Error|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|"
                r"ProcessGroupNCCL", re.I),
     "NCCL failed between GPUs/nodes: rerun with NCCL_DEBUG=INFO (exported, `launch` writes it to .deepspeed_env) "
     "and check NCCL_SOCKET_IFNAME (the interface the nodes share) or try NCCL_IB_DISABLE=1"),
    (re.compile(r"no GPU resources available", re.I),
     "DeepSpeed found no GPU on this node: on a CPU-only machine set DS_ACCELERATOR=cpu"),
    (re.compile(r"node_rank is not set correctly", re.I),
     "--node_rank must be 0..N-1 for the N hosts of the hostfile, and each node needs the same hostfile"),
    (re.compile(r"CUDA out of memory|OutOfMemoryError", re.I),
     "a GPU ran out of memory: lower data.batch_size_per_gpu (raise optim.grad_accum to keep the global batch), "
     "or use deepspeed.zero_stage=3; `python -m launcher validate RECIPE` estimates the memory"),
]


def explain_launch_failure(returncode: int, stderr_text: str) -> str | None:
    """One line of advice for a launch that failed with a well-known rendezvous or environment error.

    None when the exit was clean or nothing is recognised: the child's own output is then the best guide.
    """
    if returncode == 0:
        return None
    for pattern, advice in _ADVICE:
        if pattern.search(stderr_text or ""):
            port = re.search(r"\bport:? (\d+)", stderr_text, re.I)
            return advice.replace("grep PORT", f"grep {port[1]}") if port else advice
    return None


def run_command(argv: Sequence[str], env: Mapping[str, str], out: TextIO | None = None, err: TextIO | None = None
                ) -> int:
    """Run `argv`, its output streamed through as it comes, and explain a failure we recognise.

    A subprocess rather than exec: the last lines of its output are needed to explain the failure.
    """
    out, err = out or sys.stdout, err or sys.stderr
    tail: deque[str] = deque(maxlen=256)  # the last chunks of output, enough for the final traceback
    proc = subprocess.Popen(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, tail), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, tail), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the child too: let DeepSpeed stop its ranks
        proc.wait()
        raise
    finally:
        for pump in pumps:
            pump.join(timeout=5)
    advice = explain_launch_failure(returncode, "".join(tail))
    if advice:
        print(f"launch failed (exit {returncode}): {advice}", file=err)
    return returncode


def _pump(source: BinaryIO, sink: TextIO, tail: deque[str]) -> None:
    """Copy a child's output as it comes, in chunks (progress bars redraw with \r, not whole lines)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(source.fileno(), 65536):
        text = decoder.decode(chunk)
        sink.write(text)
        sink.flush()
        tail.append(text)


# --------------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """What `launch` prints or runs: commands (each with a comment), or an sbatch script."""

    commands: list[tuple[str, list[str]]] = field(default_factory=list)
    script: str | None = None
    notes: list[str] = field(default_factory=list)


def installed_runner_flags() -> set[str] | None:
    """Flags of the installed DeepSpeed runner, read from its source (importing deepspeed takes seconds).

    None when DeepSpeed is not installed here, e.g. when only printing commands on a login node.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("deepspeed")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    runner = Path(next(iter(spec.submodule_search_locations))) / "launcher" / "runner.py"
    try:
        return set(re.findall(r"[\"'](--\w+)[\"']", runner.read_text(encoding="utf-8")))
    except OSError:
        return None


def require_no_ssh_support(flags: set[str] | None) -> None:
    """Per-node and SLURM launches need `--no_ssh` (DeepSpeed >= 0.14): fail here, not on every node."""
    if flags is not None and "--no_ssh" not in flags:
        raise LauncherError("the installed DeepSpeed has no --no_ssh (added in 0.14), which --mode per-node and "
                            "--mode slurm need: `pip install -c constraints.txt deepspeed`, or use --mode hostfile")


def cuda_device_count() -> int:
    """GPUs on this machine; 0 without torch or a working driver (a login node)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - any failure here only means "no GPU to count"
        return 0


def default_num_gpus() -> int:
    """GPUs on this machine, at least 1 (DeepSpeed on the CPU with DS_ACCELERATOR=cpu runs one rank)."""
    return max(cuda_device_count(), 1)


def check_launcher(launcher: str | None) -> None:
    if launcher is not None and launcher.lower() not in DEEPSPEED_LAUNCHERS:
        raise LauncherError(f"--launcher {launcher} is not one of DeepSpeed's: {', '.join(DEEPSPEED_LAUNCHERS)} "
                            f"(pdsh is the ssh one, and the default)")


def plan_single(train: Sequence[str], num_gpus: int, master_port: int | None) -> Plan:
    return Plan([(f"one node, {num_gpus} rank(s)", single_command(train, num_gpus, master_port))])


def plan_hostfile(train: Sequence[str], hostfile: str, hosts: Sequence[Host], master_addr: str, master_port: int,
                  launcher: str | None, hide_exports: bool) -> Plan:
    cmd = hostfile_command(train, hostfile, master_addr, master_port, launcher, hide_exports)
    comment = f"{len(hosts)} node(s), world size {world_size(hosts)}, started from here through {launcher or 'pdsh'}"
    notes = []
    if hide_exports:
        notes.append("--log_level warning: DeepSpeed logs its pdsh command line at info level, and that line holds "
                     "the exported values of .deepspeed_env (secrets included)")
    return Plan([(comment, cmd)], notes=notes)


def plan_per_node(train: Sequence[str], hostfile: str, hosts: Sequence[Host], master_addr: str, master_port: int,
                  node_rank: int | None) -> Plan:
    if node_rank is not None and not 0 <= node_rank < len(hosts):
        raise LauncherError(f"--node-rank {node_rank} is outside 0..{len(hosts) - 1}: {hostfile} lists "
                            f"{len(hosts)} host(s), numbered in file order")
    chosen = hosts if node_rank is None else [hosts[node_rank]]
    commands = [(f"node {h.index} of {len(hosts)} ({h.name}, {h.slots} rank(s); world size {world_size(hosts)}): "
                 f"run on {h.name}", per_node_command(train, hostfile, h.index, master_addr, master_port))
                for h in chosen]
    notes = [f"run each command from {Path.cwd()} on its node (same path everywhere); node 0 hosts the rendezvous "
             f"at {master_addr}:{master_port}",
             "with --no_ssh DeepSpeed does not read .deepspeed_env: export those variables on each node, or start "
             "each node with `python -m launcher launch --mode per-node --node-rank I --run`, which adds them"]
    return Plan(commands, notes=notes)


def plan_slurm(train: Sequence[str], job: SlurmJob) -> Plan:
    return Plan(script=slurm_script(train, job))


# ------------------------------------------------------------------------------------------------ the command
# Which options make sense in which mode: anything else is refused, so a flag never silently does nothing.
_ONLY_FOR = {
    "hostfile": ("--hostfile", ("hostfile", "per-node")),
    "node_rank": ("--node-rank", ("per-node",)),
    "master_addr": ("--master-addr", ("hostfile", "per-node")),
    "launcher": ("--launcher", ("hostfile",)),
    "num_gpus": ("--num-gpus", ("single", "slurm")),
    "nodes": ("--nodes", ("slurm",)),
    "partition": ("--partition", ("slurm",)),
    "time": ("--time", ("slurm",)),
    "write": ("--write", ("slurm",)),
}


def check_options(args) -> None:
    """Refuse options the chosen mode would ignore, saying which modes take them."""
    for attr, (flag, modes) in _ONLY_FOR.items():
        if getattr(args, attr, None) is not None and args.mode not in modes:
            hint = {"num_gpus": "; with a hostfile, each line's slots= says how many GPUs that node uses"}.get(attr, "")
            raise LauncherError(f"{flag} does not apply to --mode {args.mode}: it is for --mode "
                                f"{' or '.join(modes)}{hint}")
    if args.mode in ("hostfile", "per-node") and args.hostfile is None:
        raise LauncherError(f"--mode {args.mode} needs --hostfile FILE (one `HOSTNAME slots=GPUS` line per node, "
                            f"e.g. hostfiles/two_nodes.txt)")
    if args.mode == "slurm" and args.nodes is None:
        raise LauncherError("--mode slurm needs --nodes N (the nodes to allocate) and --num-gpus G (GPUs per node)")
    for flag, value in (("--num-gpus", args.num_gpus), ("--nodes", args.nodes)):
        if value is not None and value <= 0:
            raise LauncherError(f"{flag} must be at least 1, got {value}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise LauncherError(f"--master-port must be a TCP port (1..65535), got {args.master_port}")
    check_launcher(args.launcher)


def build_plan(args, train: Sequence[str], env_report: EnvFileReport | None) -> Plan:
    """The commands (or script) for `args.mode`; `args` is the `launch` subcommand's namespace."""
    port = args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT
    if args.mode == "single":
        return plan_single(train, args.num_gpus or default_num_gpus(), args.master_port)
    if args.mode == "slurm":
        require_no_ssh_support(installed_runner_flags())
        gpus = args.num_gpus or _gpus_here_or_fail()
        venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
        job = SlurmJob(args.nodes, gpus, port, Path(args.recipe).stem, args.partition, args.time, str(Path.cwd()),
                       venv, os.environ.get("DS_ENV_FILE", ".deepspeed_env"))
        return plan_slurm(train, job)
    hosts = parse_hostfile(Path(args.hostfile))
    addr = args.master_addr or hosts[0].name
    if args.mode == "hostfile":
        return plan_hostfile(train, args.hostfile, hosts, addr, port, args.launcher,
                             hide_exports=env_report is not None and env_report.has_secret)
    require_no_ssh_support(installed_runner_flags())
    return plan_per_node(train, args.hostfile, hosts, addr, port, args.node_rank)


def _gpus_here_or_fail() -> int:
    count = cuda_device_count()
    if count <= 0:
        raise LauncherError("--mode slurm needs --num-gpus G (GPUs per node): this machine has no GPU to count")
    return count


def launch(args) -> int:
    """`python -m launcher launch`: check everything, write .deepspeed_env, then print or run the plan."""
    from launcher.recipe import load_recipe

    check_options(args)
    load_recipe(Path(args.recipe), args.overrides)  # a bad recipe or --set fails here, before any node starts
    train = train_args(args.recipe, args.overrides, args.resume, default_train_script())
    env_report = None if args.mode == "single" else plan_env_file(os.environ, env_file_path())
    plan = build_plan(args, train, env_report)
    if env_report is not None:
        env_report.write()
        print(env_report.describe(), file=sys.stderr)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.script is not None:
        return _slurm_output(args, plan.script)
    if not args.run:
        for comment, cmd in plan.commands:
            print(f"# {comment}\n{shlex.join(cmd)}")
        return 0
    return _run_plan(args, plan, env_report)


def _slurm_output(args, script: str) -> int:
    if args.write is None and not args.run:
        sys.stdout.write(script)
        return 0
    path = Path(args.write or "job.sbatch")
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    print(f"wrote {path}: submit it with `sbatch {shlex.quote(str(path))}`", file=sys.stderr)
    if not args.run:
        return 0
    return run_command([_program("sbatch", "SLURM's sbatch"), str(path)], os.environ)


def _run_plan(args, plan: Plan, env_report: EnvFileReport | None) -> int:
    if len(plan.commands) != 1:
        raise LauncherError("--mode per-node --run starts one node: run it on each node with --node-rank I (0 on "
                            "the first host of the hostfile), or drop --run to print every node's command")
    _, cmd = plan.commands[0]
    env: Mapping[str, str] = os.environ
    if args.mode == "hostfile":
        launcher = (args.launcher or "pdsh").lower()
        _program(LAUNCHER_PROGRAMS[launcher], f"--launcher {launcher}")
    if args.mode == "per-node" and env_report is not None:
        env = env_with_file(os.environ, env_report.values)
    cmd = [_program("deepspeed", "DeepSpeed's launcher"), *cmd[1:]]
    print(f"running: {shlex.join(['deepspeed', *cmd[1:]])}", file=sys.stderr)
    return run_command(cmd, env)


def _program(name: str, what: str) -> str:
    """Full path of `name`, looked up on PATH and beside this Python (an unactivated virtualenv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        advice = explain_launch_failure(127, f"{name}: command not found") or "install it or put it on PATH"
        raise LauncherError(f"{what} ({name}) is not on PATH here: {advice}")
    return found
