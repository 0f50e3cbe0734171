"""A non-editable install (a wheel, as `pip install .` or an index would give) finds everything without the
repository: the demo's corpus and recipe ship in the package, and `launch` starts training as a module."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from tests.conftest import REPO


def test_a_wheel_install_runs_from_anywhere_without_the_checkout(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of this checkout's editable install

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = run("-c", "import launcher.assets as d, launcher.tiny_model as t; print(d.__file__); "
                      "print(d.DEMO_RECIPE.is_file(), len(list(d.DEMO_CORPUS.glob('clips/*.mp3'))), "
                      "len(t.demo_sentences()))").splitlines()
    assert where[0].startswith(str(site)) and where[1].split()[:1] == ["True"]
    assert int(where[1].split()[1]) > 50 and int(where[1].split()[2]) > 50
    recipe = site / "launcher" / "assets" / "tiny_demo.yaml"
    [command] = [line for line in run("-m", "launcher", "launch", "--recipe", str(recipe), "--num-gpus", "2")
                 .splitlines() if line.startswith("deepspeed")]
    argv = shlex.split(command)
    assert argv[argv.index("--module") + 1] == "launcher.train" and "train_ds.py" not in command
    assert "--recipe" in run("-m", "launcher.train", "--help")
