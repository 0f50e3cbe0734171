"""How a run ends early: a stop request (save and stop, exit 0), or a rank that never answers (exit with a message)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def lost_rank_message(who: str, latest: str | None, resume: str) -> str:
    """The one line a rank leaves with when another went away mid-run."""
    where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was saved yet"
    return (f"{who} went away (its process ended, or its node or the network to it failed), so every rank stops; "
            f"{where}: continue with `{resume}` (on the same nodes, or on fewer)")


def hung_rank_message(minutes: float) -> str:
    return (f"error (rank {rank()}): no answer from another rank within deepspeed.timeout_minutes={minutes:g}: a rank "
            f"is hung or dead (or the network between nodes is down), so the job stops; continue from the last "
            f"checkpoint with --resume")


class StopRequest:
    """SIGTERM or SIGINT (SLURM preemption, spot reclaim, Ctrl-C), or the run folder's STOP file, asks the run to
    save and stop; the ranks agree on it at the next sync step, so all save at the same step. The file is how the
    SLURM script and `launch --run` ask (DeepSpeed's launcher kills ranks 30 s after it is signalled itself, too
    soon for a large checkpoint); rank 0 removes it once the checkpoint is saved."""

    def __init__(self, stop_file: Path) -> None:
        self.signalled = False
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def done(self) -> None:
        if rank() == 0:
            self.stop_file.unlink(missing_ok=True)

    @property
    def requested(self) -> bool:
        """This rank's view (rank 0 also looks for the stop file, on the shared run folder)."""
        return self.signalled or (rank() == 0 and self.stop_file.exists())
