"""`launcher demo` end to end (shortened): it must not depend on DeepSpeed's default port being free, and its
console must hold the project's own lines, not the libraries' INFO lines, warnings and progress bars."""

from __future__ import annotations

import re
import socket

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
NOISE = re.compile(r"\[(INFO|WARNING)\]|Writing model shards|Loading weights|FutureWarning|UserWarning|"
                   r"built successfully|Attempting to get learning rate|Traceback")


def test_the_demo_runs_with_port_29500_held_and_prints_only_its_own_lines(tmp_path):
    try:
        held = socket.create_server(("", 29500))  # DeepSpeed's default master port, as another job would hold it
    except OSError:
        held = None  # someone already holds it: the same situation
    try:
        proc = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-steps", "6", cwd=tmp_path, timeout=900)
    finally:
        if held is not None:
            held.close()
    text = proc.stdout + proc.stderr
    assert "EADDRINUSE" not in text and "--master_port 29500" not in text
    assert not NOISE.search(text), NOISE.search(text)
    assert "test: WER" in text and (tmp_path / "demo" / "run" / "final" / "model.safetensors").is_file()
    lines = [line for line in text.splitlines() if line.strip()]
    print(f"the shortened demo printed {len(lines)} lines")  # the figure for the issue note
