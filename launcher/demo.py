"""`launcher demo`: the whole flow on the small bundled French corpus, on the CPU, in a few minutes:
shard -> inspect -> train (2 DeepSpeed ranks on the CPU, gloo) -> evaluate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "assets" / "demo_corpus" / "fr"


def run_demo(out: Path, workers: int = 2) -> int:
    from launcher.cli import main as cli
    from launcher.tiny_model import build_tiny_whisper

    console = Console()
    out = Path(out).resolve()
    shards, model, run = out / "shards", out / "tiny-whisper", out / "run"
    console.rule("[bold]1. shard[/] the bundled corpus (Common Voice layout, 3 deliberately bad rows)")
    rc = cli(["shard", "--lang", "fr", "--source", f"cv:{DEMO_CORPUS}", "--out", str(shards),
              "--workers", str(workers), "--shard-size", "0.5"])
    if rc:
        return rc
    console.rule("[bold]2. inspect[/] the shards and verify every sha256")
    if rc := cli(["inspect", str(shards), "--verify"]):
        return rc
    console.rule("[bold]3. train[/] a tiny random Whisper: 2 DeepSpeed ranks on the CPU (ZeRO-2, gloo)")
    build_tiny_whisper(model)
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "train_ds.py", "--recipe",
           "recipes/tiny_demo.yaml", "--set", f"model.name_or_path={model}", f"data.shards={shards}",
           f"output_dir={run}"]
    console.print("$ DS_ACCELERATOR=cpu deepspeed " + " ".join(cmd[1:]))
    if rc := subprocess.run(cmd, cwd=REPO, env=env).returncode:
        console.print(f"[red]training exited {rc}[/]")
        return rc
    console.rule("[bold]4. evaluate[/] the delivered model on test, as the event scored it")
    if rc := cli(["evaluate", "--model", str(run / "final"), "--shards", str(shards), "--split", "test",
                  "--max-new-tokens", "64", "--out", str(run / "eval")]):
        return rc
    console.rule("[bold]where everything went")
    console.print(f"shards:       {shards}/<split>/*.tar  (index.json, dropped.jsonl)\n"
                  f"tiny model:   {model}\n"
                  f"run:          {run}  (recipe.yaml, ds_config.json, train_log.jsonl, tensorboard/)\n"
                  f"checkpoints:  {run / 'checkpoints'}\n"
                  f"best, final:  {run / 'best'}, {run / 'final'} (Hugging Face format, README.md model card)\n"
                  f"evaluation:   {run / 'eval'}/*.json, *.predictions.jsonl\n"
                  "The model is tiny and random at the start: the demo shows the flow, not a useful WER.")
    return 0
