"""The warm ranks (`launcher.testing.ranks`) stand in for the ranks DeepSpeed's launcher starts in most tests: what a
rank's code can observe of how it was started must be the same."""

from __future__ import annotations

import subprocess
import sys

from launcher.testing import ranks

PROBE = "import multiprocessing, sys; print('start method:', multiprocessing.get_start_method(), file=sys.stderr)\n"


def test_a_warm_rank_starts_its_loader_workers_as_a_launched_rank_does(tmp_path):
    """A forkserver's children inherit "forkserver" as their start method: every DataLoader worker of a warm rank
    came from a new forkserver of its own (an interpreter importing torch and the project, ~2.5 s each run), where a
    rank that DeepSpeed's launcher starts (a plain interpreter) forks them."""
    (tmp_path / "probe.py").write_text(PROBE)
    plain = subprocess.run([sys.executable, "probe.py"], cwd=tmp_path, capture_output=True, text=True, check=True)
    with ranks.start("probe.py", ranks=1, cwd=tmp_path, logs=tmp_path / "logs") as job:
        assert job.wait(60) == [0]
        warm = job.output
    assert plain.stderr.strip() in warm.splitlines(), (plain.stderr, warm)
