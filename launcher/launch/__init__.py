"""`python -m launcher launch`: the DeepSpeed command lines for one node, many nodes, or SLURM.

Why this exists: starting training on N nodes goes wrong in a few well-known ways (a hostfile typo found only
by pdsh, HF_TOKEN missing on the other nodes, a port still held by yesterday's job). `launch` checks the
recipe, the hostfile and that the options fit the mode, builds the exact commands, prints them
(copy-pasteable, quoted with `shlex.join`) or runs them, and turns the usual failures into one line of advice.

The parts: hostfile.py (hostfiles), commands.py (the command line of each mode, the SLURM script),
envfile.py (.deepspeed_env and its secrets), advice.py (failure advice, running a command). This file: the
options, their checks, the plan, and printing or running it. It imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from launcher.errors import LauncherError
from launcher.launch.advice import (
    FailureContext,
    explain_launch_failure,
    other_nodes_chatter,
    recipe_memory_note,
    run_command,
)
from launcher.launch.commands import (
    DEEPSPEED_LAUNCHERS,
    DEFAULT_MASTER_PORT,
    LAUNCHER_PROGRAMS,
    TRAIN_MODULE,
    TRAIN_SCRIPT,
    SlurmJob,
    free_port,
    hostfile_command,
    per_node_command,
    single_command,
    slurm_script,
    train_args,
    train_entry,
)
from launcher.launch.envfile import (
    EnvFileReport,
    env_file_path,
    env_with_file,
    is_propagated,
    is_secret,
    plan_env_file,
    read_env_file,
    update_env_file,
)
from launcher.launch.hostfile import Host, parse_hostfile, world_size
from launcher.run_folder import RunFolder

__all__ = [
    "DEFAULT_MASTER_PORT", "MODES", "TRAIN_MODULE", "TRAIN_SCRIPT", "FailureContext", "Host",
    "LaunchOptions", "Mode", "env_with_file", "explain_launch_failure", "free_port", "installed_runner_flags",
    "is_propagated", "is_secret", "launch", "parse_hostfile", "read_env_file", "run_command", "train_entry",
    "update_env_file", "world_size",
]

Mode = Literal["single", "hostfile", "per-node", "slurm"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(frozen=True)
class LaunchOptions:
    """The `launch` subcommand's options. None means "not given", so that an option the mode would ignore can
    be refused rather than silently dropped, and the defaults can depend on the mode."""

    recipe: str
    overrides: tuple[str, ...] = ()
    resume: bool = False
    mode: Mode = "single"
    hostfile: str | None = None
    num_gpus: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None  # None: a free port on node 0 when it is this machine (slurm: from the job id)
    launcher: str | None = None
    nodes: int | None = None
    cpu_ranks: int | None = None  # slurm: ranks per node on a CPU partition (instead of --num-gpus)
    partition: str | None = None
    time: str | None = None
    write: str | None = None
    run: bool = False


@dataclass
class Plan:
    """What `launch` prints or runs: commands (each with a comment), or an sbatch script."""

    commands: list[tuple[str, list[str]]] = field(default_factory=list)
    script: str | None = None
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    master_port: int | None = None


# ------------------------------------------------------------------------------------------------- the checks
# Which options make sense in which mode: anything else is refused, so a flag never silently does nothing.
_ONLY_FOR = {
    "hostfile": ("--hostfile", ("hostfile", "per-node")),
    "node_rank": ("--node-rank", ("per-node",)),
    "master_addr": ("--master-addr", ("hostfile", "per-node")),
    "launcher": ("--launcher", ("hostfile",)),
    "num_gpus": ("--num-gpus", ("single", "slurm")),
    "nodes": ("--nodes", ("slurm",)),
    "cpu_ranks": ("--cpu-ranks", ("slurm",)),
    "partition": ("--partition", ("slurm",)),
    "time": ("--time", ("slurm",)),
    "write": ("--write", ("slurm",)),
}


def check_options(options: LaunchOptions) -> None:
    """Refuse options the chosen mode would ignore, saying which modes take them."""
    if options.mode not in MODES:
        raise LauncherError(f"--mode {options.mode} is not one of {', '.join(MODES)}")
    for attr, (flag, modes) in _ONLY_FOR.items():
        if getattr(options, attr) is not None and options.mode not in modes:
            hint = {"num_gpus": "; with a hostfile, each line's slots= says how many GPUs that node uses"}.get(attr, "")
            raise LauncherError(f"{flag} does not apply to --mode {options.mode}: it is for --mode "
                                f"{' or '.join(modes)}{hint}")
    if options.mode in ("hostfile", "per-node") and options.hostfile is None:
        raise LauncherError(f"--mode {options.mode} needs --hostfile FILE (one `HOSTNAME slots=GPUS` line per node, "
                            f"e.g. hostfiles/two_nodes.txt)")
    if options.mode == "slurm" and options.nodes is None:
        raise LauncherError("--mode slurm needs --nodes N (the nodes to allocate) and --num-gpus G (GPUs per node)")
    if options.num_gpus is not None and options.cpu_ranks is not None:
        raise LauncherError("--num-gpus and --cpu-ranks: one or the other (GPUs per node, or ranks per node on a CPU "
                            "partition)")
    for flag, value in (("--num-gpus", options.num_gpus), ("--nodes", options.nodes),
                        ("--cpu-ranks", options.cpu_ranks)):
        if value is not None and value <= 0:
            raise LauncherError(f"{flag} must be at least 1, got {value}")
    if options.master_port is not None and not 0 < options.master_port < 65536:
        raise LauncherError(f"--master-port must be a TCP port (1..65535), got {options.master_port}")
    if options.launcher is not None and options.launcher.lower() not in DEEPSPEED_LAUNCHERS:
        raise LauncherError(f"--launcher {options.launcher} is not one of DeepSpeed's: "
                            f"{', '.join(DEEPSPEED_LAUNCHERS)} (pdsh is the ssh one, and the default)")


def installed_runner_flags() -> set[str] | None:
    """Flags of the installed DeepSpeed runner, read from its source (importing deepspeed takes seconds).

    None when DeepSpeed is not installed here, e.g. when only printing commands on a login node.
    """
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


# ---------------------------------------------------------------------------------------------------- the plan
def build_plan(options: LaunchOptions, train: Sequence[str], env_report: EnvFileReport | None, output_dir: Path
               ) -> Plan:
    """The commands (or script) for `options.mode`; `output_dir` is the recipe's, for SLURM's stop file."""
    if options.mode == "single":
        gpus = options.num_gpus or max(cuda_device_count(), 1)  # 1: DeepSpeed on the CPU (DS_ACCELERATOR=cpu)
        port = options.master_port or free_port()  # 29500 would collide with a second job on this machine
        return Plan([(f"one node, {gpus} rank(s)", single_command(train, gpus, port))], world_size=gpus,
                    master_port=port)
    if options.mode == "slurm":
        require_no_ssh_support(installed_runner_flags())
        ranks = options.cpu_ranks or options.num_gpus or _gpus_here_or_fail()
        venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
        job = SlurmJob(nodes=options.nodes or 1, ranks_per_node=ranks, stop_path=str(RunFolder(output_dir).stop_file),
                       master_port=options.master_port, cpu=options.cpu_ranks is not None,
                       job_name=Path(options.recipe).stem, partition=options.partition, time=options.time,
                       workdir=str(Path.cwd()), venv=venv, env_file=os.environ.get("DS_ENV_FILE", ".deepspeed_env"))
        return Plan(script=slurm_script(train, job), world_size=job.nodes * ranks, master_port=options.master_port)
    hosts = parse_hostfile(Path(options.hostfile or ""))
    addr = options.master_addr or hosts[0].name
    port = options.master_port or rendezvous_port(addr)
    if options.mode == "hostfile":
        return _plan_hostfile(options, train, hosts, addr, port)
    require_no_ssh_support(installed_runner_flags())
    return _plan_per_node(options, train, hosts, addr, port)


def _plan_hostfile(options: LaunchOptions, train: Sequence[str], hosts: Sequence[Host], master_addr: str,
                   master_port: int) -> Plan:
    cmd = hostfile_command(train, options.hostfile or "", master_addr, master_port, options.launcher)
    comment = (f"{len(hosts)} node(s), world size {world_size(hosts)}, started from here through "
               f"{options.launcher or 'pdsh'}")
    notes: list[str] = []
    return Plan([(comment, cmd)], notes=notes, world_size=world_size(hosts), master_port=master_port)


def _plan_per_node(options: LaunchOptions, train: Sequence[str], hosts: Sequence[Host], master_addr: str,
                   master_port: int) -> Plan:
    hostfile, node_rank = options.hostfile or "", options.node_rank
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
    return Plan(commands, notes=notes, world_size=world_size(hosts), master_port=master_port)


def rendezvous_port(master_addr: str) -> int:
    """A port for a multi-node rendezvous on `master_addr`: one free right now when that is this machine (the usual
    case: the command runs on node 0), else one picked at random above DeepSpeed's 29500, since another machine's
    ports cannot be probed from here (pass --master-port to choose it)."""
    import random
    import socket

    try:
        here = {"localhost", socket.gethostname(), socket.getfqdn()}
        local = master_addr in here or socket.gethostbyname(master_addr).startswith("127.") or \
            socket.gethostbyname(master_addr) in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        local = False
    return free_port() if local else random.randint(DEFAULT_MASTER_PORT + 1, 60000)


def _gpus_here_or_fail() -> int:
    count = cuda_device_count()
    if count <= 0:
        raise LauncherError("--mode slurm needs --num-gpus G (GPUs per node): this machine has no GPU to count")
    return count


# ------------------------------------------------------------------------------------------------ the command
def launch(options: LaunchOptions) -> int:
    """`python -m launcher launch`: check everything, write .deepspeed_env, then print or run the plan."""
    from launcher.recipe.load import load_recipe

    check_options(options)
    recipe = load_recipe(Path(options.recipe), list(options.overrides))  # fails here, before any node starts
    train = train_args(options.recipe, options.overrides, options.resume, train_entry())
    env_report = None if options.mode == "single" else plan_env_file(_nodes_env(options), env_file_path())
    plan = build_plan(options, train, env_report, recipe.output_dir)
    if env_report is not None:
        env_report.write()
        print(env_report.describe(), file=sys.stderr)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.script is not None:
        return _slurm_output(options, plan.script)
    if not options.run:
        for comment, cmd in plan.commands:
            print(f"# {comment}\n{shlex.join(cmd)}")
        return 0
    context = FailureContext(plan.master_port, lambda: recipe_memory_note(recipe, plan.world_size))
    return _run_plan(options, plan, env_report, context, recipe)


def _nodes_env(options: LaunchOptions) -> dict[str, str]:
    """This environment, plus the hostfile's hosts in order (LAUNCHER_NODES): every rank can then name its node as the
    hostfile does (`distributed.node_name`), where several nodes may share a host name."""
    if options.mode not in ("hostfile", "per-node") or options.hostfile is None:
        return dict(os.environ)
    return {**os.environ, "LAUNCHER_NODES": ",".join(h.name for h in parse_hostfile(Path(options.hostfile)))}


def _slurm_output(options: LaunchOptions, script: str) -> int:
    if options.write is None and not options.run:
        sys.stdout.write(script)
        return 0
    path = Path(options.write or "job.sbatch")
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    print(f"wrote {path}: submit it with `sbatch {shlex.quote(str(path))}`", file=sys.stderr)
    if not options.run:
        return 0
    return run_command([_program("sbatch", "SLURM's sbatch"), str(path)], os.environ)


def _run_plan(options: LaunchOptions, plan: Plan, env_report: EnvFileReport | None, context: FailureContext,
              recipe) -> int:
    if len(plan.commands) != 1:
        raise LauncherError("--mode per-node --run starts one node: run it on each node with --node-rank I (0 on "
                            "the first host of the hostfile), or drop --run to print every node's command")
    _preflight(options, recipe, plan.world_size)
    _, cmd = plan.commands[0]
    env: Mapping[str, str] = os.environ
    if options.mode == "hostfile":
        launcher = (options.launcher or "pdsh").lower()
        _program(LAUNCHER_PROGRAMS[launcher], f"--launcher {launcher}")
    if options.mode == "per-node" and env_report is not None:
        env = env_with_file(os.environ, env_report.public)
    cmd = [_program("deepspeed", "DeepSpeed's launcher"), *cmd[1:]]
    print(f"running: {shlex.join(['deepspeed', *cmd[1:]])}", file=sys.stderr)
    drop = other_nodes_chatter(parse_hostfile(Path(options.hostfile))[0].name) if options.mode == "hostfile" else None
    return run_command(cmd, env, context=context, stop_file=RunFolder(recipe.output_dir).stop_file, drop=drop)


def _preflight(options: LaunchOptions, recipe, world_size: int) -> None:
    """This machine's half of `launcher doctor` (the ranks check the rest when they start). From a machine that is
    not a GPU node (pdsh from a workstation), its hardware is not the job's and is not checked."""
    from launcher.doctor import failed, preflight_local, render

    checks = preflight_local(recipe, world_size, hardware=options.mode in ("single", "per-node"))
    if failed(checks):
        print(render([c for c in checks if c.status in ("FAIL", "WARN")]), file=sys.stderr)
        raise LauncherError("the preflight failed (above): fix it, or see `python -m launcher doctor --recipe "
                            f"{options.recipe}`")


def _program(name: str, what: str) -> str:
    """Full path of `name`, looked up on PATH and beside this Python (an unactivated virtualenv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        advice = explain_launch_failure(127, f"{name}: command not found") or "install it or put it on PATH"
        raise LauncherError(f"{what} ({name}) is not on PATH here: {advice}")
    return found
