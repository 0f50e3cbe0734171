"""DeepSpeed hostfiles (`HOSTNAME slots=GPUS` per line), checked before any node starts.

Parsed here rather than left to DeepSpeed so that a typo fails with the file and the line, and so that the
per-node commands can be numbered and the world size printed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LauncherError

_HOST_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\S+)\s*(?:#.*)?")


@dataclass(frozen=True)
class Host:
    """One line of a hostfile: DeepSpeed numbers the nodes in file order, so `index` is the node rank."""

    name: str
    slots: int
    line: int
    index: int


def parse_hostfile(path: Path) -> list[Host]:
    """Read `host slots=N` lines ('#' comments, blank lines allowed)."""
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
        name, slots = _parse_host_line(path, number, line, seen)
        seen[name] = number
        hosts.append(Host(name, slots, number, len(hosts)))
    if not hosts:
        raise LauncherError(f"hostfile {path} lists no hosts: add one `HOSTNAME slots=GPUS` line per node")
    return hosts


def _parse_host_line(path: Path, number: int, line: str, seen: Mapping[str, int]) -> tuple[str, int]:
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
    return name, slots


def world_size(hosts: Sequence[Host]) -> int:
    """Ranks in the job: DeepSpeed starts one process per slot of every host."""
    return sum(h.slots for h in hosts)
