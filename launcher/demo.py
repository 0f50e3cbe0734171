"""`launcher demo`: the whole flow on the small bundled French corpus, on the CPU, in a few minutes:
shard -> inspect -> train (2 DeepSpeed ranks on the CPU, gloo) -> evaluate.

The corpus and the recipe ship inside the package (launcher/assets/), so the demo runs from any directory and
from a non-editable install."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from launcher.assets import DEMO_CORPUS, DEMO_RECIPE


def run_demo(out: Path, workers: int = 2, max_steps: int | None = None) -> int:
    from launcher.console import quiet_libraries
    from launcher.evaluation.standalone import run_standalone
    from launcher.launch import run_command
    from launcher.launch.commands import cpu_env, deepspeed_runner, free_port
    from launcher.shards.build import ShardSettings, print_summary, shard_corpus
    from launcher.shards.inspect import inspect
    from launcher.sources.common_voice import CommonVoiceRelease
    from launcher.tiny_model import build_tiny_whisper

    quiet_libraries(rank=0)
    console = Console()
    out = Path(out).resolve()
    shards, model, run = out / "shards", out / "tiny-whisper", out / "run"
    console.rule("[bold]1. shard[/] the bundled corpus (Common Voice layout, 3 deliberately bad rows)")
    index = shard_corpus(CommonVoiceRelease(DEMO_CORPUS, "fr"), shards, ShardSettings(80, 500_000, "fr"),
                         workers=workers)
    print_summary(console, [("fr", shards, index)])
    console.rule("[bold]2. inspect[/] the shards and verify every sha256")
    if inspect(shards, verify=True):
        return 1
    console.rule("[bold]3. train[/] a tiny random Whisper: 2 DeepSpeed ranks on the CPU (ZeRO-2, gloo)")
    build_tiny_whisper(model)
    shutil.rmtree(run, ignore_errors=True)
    env = cpu_env()
    overrides = [f"model.name_or_path={model}", f"data.shards={shards}", f"output_dir={run}",
                 *([f"optim.max_steps={max_steps}", f"optim.warmup_steps={max_steps // 2}",
                    f"logging.every_steps={max(1, max_steps // 3)}", "eval.every_steps=0", "checkpoint.keep_best=0",
                    "checkpoint.every_steps=0"] if max_steps else [])]
    # a free port: DeepSpeed's default 29500 may be held by another job on this machine
    cmd = [deepspeed_runner(), "--num_gpus", "2", "--master_port", str(free_port()),
           "--log_level", "error", "--module", "launcher.train", "--recipe", str(DEMO_RECIPE), "--set", *overrides]
    console.print("$ DS_ACCELERATOR=cpu deepspeed " + " ".join(cmd[1:]), highlight=False)
    if rc := run_command(cmd, env):
        console.print(f"[red]training exited {rc}[/]")
        return rc
    console.rule("[bold]4. evaluate[/] the delivered model on test, as the event scored it")
    [report] = run_standalone(str(run / "final"), [shards], "test", batch_size=16, num_beams=1, max_new_tokens=64,
                              max_samples=None, language=None, task="transcribe", out_dir=run / "eval", zero_stage=0,
                              precision="fp32").values()
    console.print(f"test: WER {report['wer']:.2f}% (orthographic {report['wer_orthographic']:.2f}%, CER "
                  f"{report['cer']:.2f}%) on {report['scored']} of {report['samples']} clips")
    console.rule("[bold]where everything went")
    console.print(f"shards:       {shards}/<split>/*.tar  (index.json, dropped.jsonl)\n"
                  f"tiny model:   {model}\n"
                  f"run:          {run}  (recipe.yaml, ds_config.json, train_log.jsonl, tensorboard/)\n"
                  f"checkpoints:  {run / 'checkpoints'}\n"
                  f"best, final:  {run / 'best'}, {run / 'final'} (Hugging Face format, README.md model card)\n"
                  f"evaluation:   {run / 'eval'}/*.json, *.predictions.jsonl\n"
                  "The model is tiny and random at the start: the demo shows the flow, not a useful WER.",
                  highlight=False)
    return 0
