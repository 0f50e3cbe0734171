"""`.deepspeed_env`: how the variables of this shell (hub cache, wandb, NCCL tuning, DeepSpeed's accelerator) reach
the other nodes, and `.deepspeed_secrets`: how its secrets (HF_TOKEN, WANDB_API_KEY) do, on no command line.

DeepSpeed's multi-node runner exports to every node the `NAME=VALUE` lines of `.deepspeed_env`, read from `~`
and then from the current directory (`DS_ENV_FILE` renames it), as `export NAME=VALUE;` on the pdsh command line:
readable in the process list of every node for as long as the job runs. So secrets go to `.deepspeed_secrets` beside
it instead (mode 0600, like `.deepspeed_env`), whose path `.deepspeed_env` carries as LAUNCHER_SECRETS; every rank
reads the variables it lacks from there at its start (`load_secrets`), from the same path on every node (a shared
filesystem, or a copy). Only names are ever printed. DeepSpeed reads `.deepspeed_env` only when it starts the nodes
itself (pdsh/MPI); with `--no_ssh` it does not, so the SLURM script and `per-node --run` add the variables from it
that a node's environment lacks (`env_with_file`).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import LauncherError

PROPAGATED_PREFIXES = ("HF_", "HUGGING_FACE_", "WANDB_", "NCCL_", "TORCH_NCCL_", "TRANSFORMERS_")
PROPAGATED_NAMES = ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "LAUNCHER_NODES")
SECRETS_VARIABLE = "LAUNCHER_SECRETS"  # in .deepspeed_env: where the secrets file is
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
# DeepSpeed's pdsh runner double-quotes a value with any other character, so the remote shell would expand
# `$`, backquotes and backslashes, and a `"` would end the quoting; it also strips surrounding whitespace.
_MANGLED_BY_DEEPSPEED = re.compile(r'["$`\\\n\r]')
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def secrets_path(env_file: Path) -> Path:
    """The secrets file beside `.deepspeed_env` (DS_ENV_FILE's name plus `.secrets` when renamed)."""
    name = ".deepspeed_secrets" if env_file.name == ".deepspeed_env" else f"{env_file.name}.secrets"
    return env_file.with_name(name)


@dataclass
class EnvFileReport:
    """What `update_env_file` did, by variable name only (values never leave the files)."""

    path: Path
    values: dict[str, str] = field(default_factory=dict)  # all of them, secrets included
    from_env: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    written: bool = False

    @property
    def secrets_path(self) -> Path:
        return secrets_path(self.path)

    @property
    def public(self) -> dict[str, str]:
        """What `.deepspeed_env` holds: the values that are not secret, and the secrets file's path."""
        out = {k: v for k, v in self.values.items() if not is_secret(k) and k != SECRETS_VARIABLE}
        if self.has_secret:
            out[SECRETS_VARIABLE] = str(self.secrets_path.resolve())
        return out

    @property
    def secrets(self) -> dict[str, str]:
        return {k: v for k, v in self.values.items() if is_secret(k)}

    def describe(self) -> str:
        if not self.written:
            return (f"{self.path.name} not written: no {', '.join(p + '*' for p in PROPAGATED_PREFIXES)} or "
                    f"PYTHONPATH variable in this environment")
        names = [_label(n) for n in self.from_env] + [f"{_label(n)} (kept from the file)" for n in self.kept]
        text = f"wrote {self.path}: {', '.join(names) or 'nothing'}"
        if self.has_secret:
            text += f" (the hidden ones into {self.secrets_path}, mode 0600, which every rank reads at its start)"
        if self.skipped:
            text += (f"\nnot written: {', '.join(self.skipped)}: DeepSpeed's runner would mangle the value (it has "
                     f"one of \" $ ` \\, a line break or surrounding spaces); set it on every node yourself")
        return text

    def write(self) -> None:
        """Write the files, unless there is nothing to write and no file to update."""
        if self.values or self.path.is_file():
            write_env_file(self.path, self.public)
            self.written = True
        if self.has_secret or self.secrets_path.is_file():
            write_env_file(self.secrets_path, self.secrets)

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
    existing.pop(SECRETS_VARIABLE, None)
    if secrets_path(path).is_file():
        existing.update(read_env_file(secrets_path(path)))
    values, skipped = propagated_env(environ, path.parent)
    return EnvFileReport(path, {**existing, **values}, sorted(values), sorted(set(existing) - set(values)), skipped)


def env_with_file(environ: Mapping[str, str], file_values: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus the file's variables it lacks: what the slurm script does, for `per-node --run`.

    With --no_ssh DeepSpeed's runner never reads .deepspeed_env (only its pdsh/MPI branch does), so a node
    started per node gets the file's variables only this way.
    """
    return {**{k: v for k, v in file_values.items() if k not in environ}, **environ}


def load_secrets(environ: dict | None = None) -> list[str]:
    """At a rank's start: the variables of the secrets file that `.deepspeed_env` names (LAUNCHER_SECRETS) and this
    process lacks, into its environment. Returns their names."""
    from launcher.errors import LauncherError

    environ = os.environ if environ is None else environ
    path = environ.get(SECRETS_VARIABLE)
    if not path:
        return []
    if not Path(path).is_file():
        raise LauncherError(f"{SECRETS_VARIABLE} names {path}, which this node does not have: `launch` wrote it on the "
                            "node it ran on; put the run's working folder on a filesystem every node shares, or copy "
                            "the file there (mode 0600)")
    added = [k for k in read_env_file(Path(path)) if k not in environ]
    for name, value in read_env_file(Path(path)).items():
        environ.setdefault(name, value)
    return added
