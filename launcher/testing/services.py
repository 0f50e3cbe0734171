"""Real cluster services on one machine, for the multi-node tests (and, read as a recipe, for a first dry run on two
real machines): an sshd that pdsh reaches on loopback "nodes" (127.0.0.1, 127.0.0.2, ...), a munge daemon, and a
Slurm controller with one slurmd per node. Each lives in a temporary folder of its own (keys, configuration, state,
logs), listens on free ports, and is stopped by its context manager; the machine's own configuration (/etc/ssh,
/etc/slurm, /etc/munge, ~/.ssh) is never read or written. Programs come from Debian's packages (openssh-server,
pdsh, munge, slurmctld, slurmd: `make setup` installs them where it can); `missing` says which are not here.

    with Sshd(folder) as sshd:                 # ssh/pdsh from sshd.env() reach 127.0.0.1 and 127.0.0.2 as this user
        subprocess.run(["pdsh", "-w", "127.0.0.1,127.0.0.2", "hostname"], env=sshd.env(os.environ))
    with Munge(folder) as munge, Slurm(folder, munge, nodes=2) as slurm:
        subprocess.run(["sbatch", "job.sbatch"], env=slurm.env(os.environ))
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from launcher.testing.env import free_port

PROGRAMS = {"sshd": "/usr/sbin/sshd", "ssh": "ssh", "ssh-keygen": "ssh-keygen", "pdsh": "pdsh",
            "munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd",
            "sbatch": "sbatch", "scontrol": "scontrol", "scancel": "scancel", "squeue": "squeue"}
NODES = ("127.0.0.1", "127.0.0.2")  # loopback addresses: every one of 127/8 is this machine


def missing(*names: str) -> list[str]:
    """The programs of `names` (keys of PROGRAMS) that are not installed here."""
    return [n for n in names if not (shutil.which(PROGRAMS[n]) or Path(PROGRAMS[n]).is_file())]


def _wait_for(check, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    text = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s; its log ({log}):\n{text}")


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class _Daemon:
    """A daemon in the foreground of a process of its own session, stopped (and its group killed) on exit."""

    def __init__(self, folder: Path, name: str):
        self.folder = Path(folder) / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / f"{name}.log"
        self.procs: list[subprocess.Popen] = []

    def _start(self, argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        out = open(self.log, "ab")  # noqa: SIM115 - the daemon holds it; closed with the process
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(env) if env is not None else None)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


class Sshd(_Daemon):
    """sshd on a free port of every loopback "node", with throwaway host and user keys. `env(base)` puts an `ssh`
    that uses them first on PATH, so ssh and pdsh (its ssh module runs `ssh`) reach the nodes as this user."""

    def __init__(self, folder: Path, nodes: tuple[str, ...] = NODES):
        super().__init__(folder, "sshd")
        self.nodes, self.port, self.user = nodes, free_port(), getpass.getuser()
        self.bin = self.folder / "bin"

    def __enter__(self) -> Sshd:
        f = self.folder
        for key in ("host_key", "user_key"):
            subprocess.run([PROGRAMS["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(f / key)], check=True)
        shutil.copy(f / "user_key.pub", f / "authorized_keys")
        (f / "authorized_keys").chmod(0o600)
        listen = "".join(f"ListenAddress {node}:{self.port}\n" for node in self.nodes)
        (f / "sshd_config").write_text(
            f"{listen}HostKey {f / 'host_key'}\nAuthorizedKeysFile {f / 'authorized_keys'}\nPidFile {f / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPrintMotd no\nX11Forwarding no\n"
            "AllowTcpForwarding no\nLogLevel VERBOSE\n")
        (f / "ssh_config").write_text(
            f"Host *\n  Port {self.port}\n  User {self.user}\n  IdentityFile {f / 'user_key'}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which(PROGRAMS['ssh'])} -F {f / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        # sshd refuses to start without its privilege separation directory (compiled in: /run/sshd), which only the
        # package's service creates; an empty directory, nothing configured in it
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._start([PROGRAMS["sshd"], "-D", "-e", "-f", str(f / "sshd_config")])
        _wait_for(lambda: all(_port_open(node, self.port) for node in self.nodes), "sshd", self.log)
        return self

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with this sshd's ssh first on PATH, and pdsh told to use ssh."""
        return {**base, "PATH": f"{self.bin}:{base.get('PATH', os.defpath)}", "PDSH_RCMD_TYPE": "ssh"}


class Munge(_Daemon):
    """munged with a throwaway key, on a socket of its own (Slurm's daemons and clients authenticate through it)."""

    def __init__(self, folder: Path):
        super().__init__(folder, "munge")

    def __enter__(self) -> Munge:
        f = self.folder
        f.chmod(0o700)
        self.socket = f / "munge.socket"
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start([PROGRAMS["munged"], "--foreground", "--force", f"--key-file={key}", f"--socket={self.socket}",
                     f"--pid-file={f / 'munged.pid'}", f"--seed-file={f / 'munged.seed'}",
                     f"--log-file={self.log}"])
        _wait_for(self.socket.exists, "munged", self.log)
        return self


class Slurm(_Daemon):
    """slurmctld and one slurmd per node (NodeName localhost for one, 127.0.0.1, 127.0.0.2, ... for several), a CPU
    partition `cpu` of them, on free ports; `env(base)` points sbatch, srun, scontrol and scancel at it."""

    def __init__(self, folder: Path, munge: Munge, nodes: int = 1, cpus: int | None = None):
        super().__init__(folder, "slurm")
        self.munge, self.cpus = munge, cpus or os.cpu_count() or 1
        self.names = ["localhost"] if nodes == 1 else list(NODES[:nodes])
        self.conf = self.folder / "slurm.conf"

    def __enter__(self) -> Slurm:
        f, ctld_port = self.folder, free_port()
        ports = {name: free_port() for name in self.names}
        for sub in ("state", *(f"spool-{n}" for n in self.names)):
            (f / sub).mkdir(exist_ok=True)
        nodes = "".join(f"NodeName={n} NodeAddr={'127.0.0.1' if n == 'localhost' else n} Port={ports[n]} "
                        f"CPUs={self.cpus} State=UNKNOWN\n" for n in self.names)
        self.conf.write_text(
            "ClusterName=launcher-test\nSlurmctldHost=localhost(127.0.0.1)\n"
            f"SlurmctldPort={ctld_port}\nSlurmUser={getpass.getuser()}\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge.socket}\nCredType=cred/munge\n"
            f"StateSaveLocation={f / 'state'}\nSlurmdSpoolDir={f}/spool-%n\n"
            f"SlurmctldPidFile={f / 'slurmctld.pid'}\nSlurmdPidFile={f}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={f / 'slurmctld.log'}\nSlurmdLogFile={f}/slurmd-%n.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSchedulerType=sched/backfill\n"
            "ReturnToService=2\nSlurmdTimeout=30\nInactiveLimit=0\nKillWait=10\nMinJobAge=300\n"
            f"{nodes}PartitionName=cpu Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP\n")
        env = self.env(os.environ)
        self._start([PROGRAMS["slurmctld"], "-D", "-i", "-f", str(self.conf)], env)
        _wait_for(lambda: _port_open("127.0.0.1", ctld_port), "slurmctld", f / "slurmctld.log")
        for name in self.names:
            self._start([PROGRAMS["slurmd"], "-D", "-f", str(self.conf), "-N", name], env)
        _wait_for(self._nodes_idle, "slurmd", f / f"slurmd-{self.names[0]}.log", timeout=60)
        return self

    def _nodes_idle(self) -> bool:
        out = subprocess.run([PROGRAMS["scontrol"], "show", "nodes"], capture_output=True, text=True,
                             env=self.env(os.environ))
        states = [w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("State=")]
        return len(states) == len(self.names) and all(s.startswith("IDLE") for s in states)

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.conf)}
