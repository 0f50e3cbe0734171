"""One line of advice for a launch that failed in a well-known way, and `run_command`, which prints it.

Multi-node launches fail in a few well-known ways (a port still held by yesterday's job, a node that cannot
reach the master, a rank killed for memory, a hung rank): the child's output is passed through as it comes,
and its tail is matched against the table below. Order matters: the first match wins, so specific causes come
before the generic patterns that their output also contains (a watchdog timeout is logged by ProcessGroupNCCL).
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe


@dataclass(frozen=True)
class FailureContext:
    """What the launch knew, to make the advice concrete.

    `memory` is the recipe's memory estimate as a phrase, or a callable that computes it: it is called only
    for an out-of-memory kill, since the estimate imports torch and transformers.
    """

    master_port: int | None = None
    memory: str | Callable[[], str | None] | None = None


# A rank killed by SIGKILL: DeepSpeed's launch.py logs `[...] exits with return code = -9`; torchrun's
# ChildFailedError says `exitcode  : -9` and `Signal 9 (SIGKILL) received by PID`.
_KILLED = re.compile(r"exits with return code = -9\b|exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", re.I)
_KILLED_ADVICE = ("a rank was killed by the operating system (exit -9), most likely out of memory (`dmesg` or the "
                  "job's log names the OOM killer){estimate}: lower data.batch_size_per_gpu (raise optim.grad_accum "
                  "to keep the global batch), set model.gradient_checkpointing=true, or use deepspeed.zero_stage=3; "
                  "deepspeed.offload_optimizer=true saves GPU memory but keeps the optimizer states in host memory, "
                  "so turn it off if the host ran out")

_ADVICE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"Watchdog caught collective operation timeout|Timed out waiting \d+ms for (send|recv) operation",
                re.I),
     "a rank stopped answering (hung or dead) within the process-group timeout (deepspeed.timeout_minutes): the "
     "first rank to fail or fall silent is the cause (look above for its error, an OOM kill, a stuck data loader or "
     "a slow save to shared storage); fix that and continue from the last checkpoint with --resume"),
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


def explain_launch_failure(returncode: int, output: str, context: FailureContext | None = None) -> str | None:
    """One line of advice for a launch that failed with a well-known rendezvous, environment or resource error.

    None when the exit was clean or nothing is recognised: the child's own output is then the best guide.
    """
    if returncode == 0:
        return None
    output = output or ""
    context = context or FailureContext()
    if returncode == -signal.SIGKILL or _KILLED.search(output):
        memory = context.memory() if callable(context.memory) else context.memory
        return _KILLED_ADVICE.format(estimate=f"; {memory}" if memory else "")
    for pattern, advice in _ADVICE:
        if pattern.search(output):
            port = re.search(r"\bport:? (\d+)", output, re.I)
            port_text = port[1] if port else context.master_port
            return advice.replace("grep PORT", f"grep {port_text}") if port_text else advice
    return None


def recipe_memory_note(recipe: Recipe, world_size: int) -> str | None:
    """`validate`'s memory estimate as a phrase for the out-of-memory advice; None if it cannot be made (a hub
    model's config unreachable offline, ...): the advice then goes without numbers."""
    from launcher.recipe.checks import load_model_config
    from launcher.recipe.memory import memory_estimate

    try:
        est = memory_estimate(recipe, load_model_config(recipe.model.name_or_path), world_size)
    except Exception:  # noqa: BLE001 - the advice matters more than the numbers
        return None
    parts = ", ".join(f"{name} {est[f'{name}_gib']:.1f}" for name in ("weights", "gradients", "optimizer",
                                                                       "activations"))
    return (f"this recipe needs about {est['total_gib']:.1f} GiB per GPU at world size {world_size} ({parts} GiB; "
            f"`python -m launcher validate` shows the estimate)")


def run_command(argv: Sequence[str], env: Mapping[str, str], out: TextIO | None = None, err: TextIO | None = None,
                context: FailureContext | None = None, stop_file: Path | None = None,
                drop: Callable[[str], bool] | None = None) -> int:
    """Run `argv`, its output streamed through as it comes, and explain a failure we recognise.

    A subprocess rather than exec: the last lines of its output are needed to explain the failure.

    With `stop_file` (the run's output_dir/STOP), SIGTERM and SIGINT become a stop request, not a signal to
    DeepSpeed: its single-node runner (`deepspeed`) has no handler and dies at once, leaving launch.py running
    with parent 1, and launch.py SIGKILLs the ranks 30 s after a SIGTERM, saving or not. The command runs in a
    session of its own, out of reach of signals to this process group (Ctrl-C, `kill -- -PGID`); the first
    signal creates the stop file (every rank saves at its next step and exits 0) and this process keeps
    streaming the output until the command ends. A second signal is passed on: DeepSpeed's own stop.

    With `drop`, the output is passed on line by line, without the lines it matches (`other_nodes_chatter`).
    """
    out, err = out or sys.stdout, err or sys.stderr
    tail: deque[str] = deque(maxlen=256)  # the last chunks of output, enough for the final traceback
    requests = 0
    proc: subprocess.Popen | None = None

    def request_stop(signum: int, _frame) -> None:
        nonlocal requests
        requests += 1
        if requests == 1:
            print(f"{signal.Signals(signum).name}: asking the ranks to save a checkpoint and stop ({stop_file}); "
                  "again to stop at once", file=err)
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
        elif proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)

    # handlers first, so that no signal falls between the start and them
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)} if stop_file else {}
    proc = subprocess.Popen(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=stop_file is not None)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, tail, drop), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, tail, drop), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the child too: let DeepSpeed stop its ranks
        proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=5)
    advice = explain_launch_failure(returncode, "".join(tail), context)
    if advice:
        print(f"launch failed (exit {returncode}): {advice}", file=err)
    return returncode


def _pump(source: BinaryIO, sink: TextIO, tail: deque[str], drop: Callable[[str], bool] | None = None) -> None:
    """Copy a child's output as it comes, in chunks (progress bars redraw with \r, not whole lines), or line by line
    without the lines `drop` matches."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := os.read(source.fileno(), 65536):
        text = decoder.decode(chunk)
        if drop is not None:
            pending += text
            *lines, pending = pending.split("\n")
            text = "".join(line + "\n" for line in lines if not drop(line))
        sink.write(text)
        sink.flush()
        tail.append(text)
    if pending and not (drop and drop(pending)):
        sink.write(pending)
        sink.flush()
        tail.append(pending)


def other_nodes_chatter(first_host: str) -> Callable[[str], bool]:
    """pdsh prefixes each node's lines with its host: DeepSpeed's launcher logs the same INFO lines on every node,
    so one node's worth (the first host's) is kept and the others' are dropped; their warnings and errors, and
    everything the ranks print, pass."""
    def drop(line: str) -> bool:
        host, sep, rest = line.partition(": ")
        return bool(sep) and host != first_host and " " not in host and "[INFO]" in rest and "launch.py" in rest

    return drop
