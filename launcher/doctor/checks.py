"""What a check is and how checks are shown; small helpers they share."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["OK", "WARN", "FAIL", "SKIP"]

COMMAND_TIMEOUT_S = 15.0  # nvidia-smi, git: a hung driver or filesystem must not hang the doctor


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str  # what was found; for a failure, what is wrong
    fix: str = ""  # for WARN and FAIL: what to change


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int] | None  # (8, 0) for an A100; None when the driver does not say


def failed(checks: list[Check]) -> bool:
    return any(c.status == "FAIL" for c in checks)


def render(checks: list[Check]) -> str:
    """One line per check: status, name, what was found, and for WARN/FAIL the fix."""
    return "\n".join(_line(c) for c in checks)


def _line(check: Check, where: str = "") -> str:
    fix = f" -> fix: {check.fix}" if check.fix and check.status in ("WARN", "FAIL") else ""
    return f"{check.status:<4}  {check.name:<13} {where}{check.message}{fix}"


def _crashed(name: str, e: Exception) -> Check:
    first = str(e).splitlines()[0] if str(e) else ""
    return Check(name, "FAIL", f"the check itself failed: {type(e).__name__}: {first}",
                 "report this; the other checks still ran")


def _guarded(name: str, fn: Callable[[], Check]) -> Check:
    """A check that crashes reports itself as failed instead of stopping the doctor (or the job) with a traceback."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any surprise is a finding, not a crash
        return _crashed(name, e)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a short command, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None
