"""`python -m launcher <command>`: the verbs mirror what a user does (shard, inspect, train via launch, evaluate,
export, push, demo, ...)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from launcher.errors import LauncherError
from launcher.export import QUANTIZATIONS


def _shard(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from launcher.features import SUPPORTED_N_MELS
    from launcher.shards.build import ShardSettings, print_summary, shard_corpus
    from launcher.shards.location import is_url
    from launcher.shards.upload import Uploader
    from launcher.sources import open_source

    if args.n_mels not in SUPPORTED_N_MELS:
        raise LauncherError(f"--n-mels must be 80 (Whisper v1/v2) or 128 (large-v3), got {args.n_mels}")
    if args.shard_size <= 0:
        raise LauncherError(f"--shard-size must be a positive number of MB, got {args.shard_size}")
    languages = [lang.strip() for lang in args.lang.split(",") if lang.strip()]
    if not languages or len(set(languages)) < len(languages):
        raise LauncherError(f"--lang: got {args.lang!r}, expected language codes, each once (e.g. fr or fr,de,es)")
    several = len(languages) > 1
    if several and args.source and args.source.split(":")[0] in ("hf", "manifest"):
        raise LauncherError("--source hf:/manifest: holds one language; with several --lang use cv11, cv-hub:LOCATION "
                            "or a Common Voice release folder holding one folder per language (cv:PATH)")
    # several languages: one folder each, under --out (default shards/); a URL --out: written in a staging folder
    # and sent as each shard is finished (`shards.upload`)
    out = args.out or ("shards" if several else f"shards/{languages[0]}")
    targets = {lang: f"{out.rstrip('/')}/{lang}" if several else out for lang in languages}
    remote = is_url(out)
    stage = Path(args.stage or Path("shards-staging") / re.sub(r"[^A-Za-z0-9._-]+", "_", out.split("://")[-1]))
    outs = {lang: (stage / lang if several else stage) if remote else Path(targets[lang]) for lang in languages}
    sources = {lang: open_source(args.source, lang, hf_config=args.hf_config, audio_column=args.audio_column,
                                 text_column=args.text_column) for lang in languages}
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
               TextColumn("{task.fields[hours]:.2f} h audio"), TextColumn("{task.fields[speed]:.0f}x real time"),
               TimeElapsedColumn())
    runs = []
    with Progress(*columns, console=console) as progress:
        for lang in languages:
            settings = ShardSettings(n_mels=args.n_mels, shard_bytes=int(args.shard_size * 1e6), language=lang)
            uploader = Uploader(outs[lang], targets[lang]) if remote else None
            index = shard_corpus(sources[lang], outs[lang], settings, workers=args.workers, overwrite=args.overwrite,
                                 splits=args.splits.split(",") if args.splits else None, progress=progress,
                                 label=f"{lang} " if several else "", on_shard=uploader and uploader.send)
            if uploader is not None:
                uploader.finish()  # the shards the store lacks, then index.json: the set is whole from now on
            runs.append((lang, outs[lang], index))
    print_summary(console, runs)
    if remote:
        console.print("uploaded: " + ", ".join(targets[lang] for lang in languages) + f" (staged in {stage})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from launcher.shards.inspect import inspect

    return 1 if inspect(args.shards, verify=args.verify) else 0


def _validate(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    from launcher.distributed import on_gpu as gpu_here
    from launcher.recipe.checks import check_against_data_and_model
    from launcher.recipe.ds_config import deepspeed_config
    from launcher.recipe.load import load_recipe, recipe_yaml
    from launcher.recipe.memory import memory_estimate

    recipe = load_recipe(Path(args.recipe), args.overrides)
    sets, config = check_against_data_and_model(recipe)
    console = Console()
    world, on_gpu = args.world_size, gpu_here()
    console.rule(f"[bold]{args.recipe}[/] (resolved)")
    console.print(Syntax(recipe_yaml(recipe), "yaml", background_color="default"))
    console.rule(f"DeepSpeed config for {world} {'GPU' if on_gpu else 'CPU rank'}(s), as train_ds.py builds it here")
    console.print_json(json.dumps(deepspeed_config(recipe, world, on_gpu=on_gpu, nodes=args.nodes,
                                                   d_model=config.get("d_model"))))
    global_batch = recipe.data.batch_size_per_gpu * recipe.optim.grad_accum * world
    split = recipe.data.train_split
    samples = sum(s.index.samples(split) for s in sets)
    if len(sets) > 1:
        from launcher.data.mixing import Mix

        mix = Mix.of(sets, split, recipe.data.mix_temperature, seed=recipe.seed, shuffle=recipe.data.shuffle)
        console.rule("mix")
        console.print(mix.describe([s.language for s in sets]))
    pack = recipe.data.pack
    if pack.enabled and samples:  # a sample is a window: about this many clips (a window closes before the next)
        clip_s = sum(s.index.data["splits"][split]["seconds"] for s in sets) / samples
        per_window = max(1.0, (pack.max_seconds - clip_s / 2) / (clip_s + pack.gap_seconds))
        console.print(f"packing: clips average {clip_s:.1f} s, so about {per_window:.1f} clips per "
                      f"{pack.max_seconds:g} s window (fewer with same_speaker); counts below are in windows")
        samples = int(samples / per_window)
    epochs = recipe.optim.max_steps * global_batch / samples if samples else float("inf")
    console.rule("schedule")
    console.print(f"global batch {global_batch} = {recipe.data.batch_size_per_gpu} per GPU x "
                  f"{recipe.optim.grad_accum} accumulation x {world} GPUs\n"
                  f"{samples:,} training samples -> {samples / global_batch:,.1f} steps per epoch; "
                  f"{recipe.optim.max_steps:,} steps = {epochs:.2f} epochs")
    est = memory_estimate(recipe, config, world)
    table = Table("parameters", "weights", "gradients", "optimizer", "activations", "total per GPU",
                  title=f"memory estimate, ZeRO-{recipe.deepspeed.zero_stage}, {recipe.deepspeed.precision} (GiB)")
    table.add_row(f"{est['parameters_millions']:.0f} M", *(f"{est[k]:.1f}" for k in
                  ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib", "total_gib")))
    console.print(table)
    console.print("measured against real runs in bench/results/memory.json: a CPU rank's peak RSS ran 16-21% above "
                  "this (freed memory glibc keeps); no GPU figure yet")
    console.print("[green]recipe OK[/]")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from launcher.doctor import run_doctor

    return run_doctor(Path(args.recipe), args.overrides, world_size=args.world_size, verify=args.verify)


def _evaluate(args: argparse.Namespace) -> int:
    if args.long_form is not None and not args.long_form > 0:
        raise LauncherError(f"--long-form must be a positive number of seconds, got {args.long_form:g}")
    if args.language and len(args.shards) > 1:  # checked before torch is imported: the answer comes at once
        raise LauncherError("--language is for one shards folder; with several, each one's index.json names its "
                            "language")
    if _names_a_folder(args.model) and not Path(args.model).expanduser().is_dir():
        raise LauncherError(f"--model {args.model}: cannot load a Whisper model and processor (no such folder)")
    from launcher.evaluation.standalone import run_standalone

    reports = run_standalone(args.model, list(args.shards), args.split, batch_size=args.batch_size,
                             num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             max_samples=args.max_samples, language=args.language, task=args.task,
                             out_dir=Path(args.out) if args.out else None, zero_stage=args.zero_stage,
                             precision=args.precision, long_form=args.long_form)
    for report in (reports or {}).values():
        unit = "recordings" if args.long_form else "clips"
        print(f"{report['split']}: WER {report['wer']:.2f}%  (orthographic {report['wer_orthographic']:.2f}%, "
              f"CER {report['cer']:.2f}%) on {report['scored']} of {report['samples']} {unit} "
              f"[{report['samples_per_s']:.1f} clips/s, {report['world_size']} process(es)]")
        if args.long_form:
            print(f"timestamps in order in {100 * report['timestamps_monotone']:.0f}% of the recordings, inside "
                  f"the audio in {100 * report['timestamps_inside']:.0f}%")
    if reports and len(reports) > 1:
        from launcher.evaluation.scoring import mean_wer

        print(f"mean WER {mean_wer(reports):.2f}% over {', '.join(reports)} (each language counting once)")
    return 0


def _names_a_folder(model: str) -> bool:
    """A path, not a hub id ("owner/name"): absolute, relative to . or ~, or deeper than one slash."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _launch(args: argparse.Namespace) -> int:
    from launcher.launch import LaunchOptions, launch

    return launch(LaunchOptions(
        recipe=args.recipe, overrides=tuple(args.overrides), resume=args.resume, mode=args.mode,
        hostfile=args.hostfile, num_gpus=args.num_gpus, node_rank=args.node_rank, master_addr=args.master_addr,
        master_port=args.master_port, launcher=args.launcher, nodes=args.nodes, cpu_ranks=args.cpu_ranks,
        partition=args.partition,
        time=args.time, write=args.write, run=args.run))


def _export(args: argparse.Namespace) -> int:
    from launcher.export import run_export

    print(f"converting {args.model} to {args.format} ({args.quantization}) ...", file=sys.stderr)
    out = run_export(Path(args.model), args.format, args.quantization, Path(args.out) if args.out else None)
    print(f"written: {out}  (faster-whisper: WhisperModel({str(out)!r}); the decoding it was scored with: "
          f"{out / 'whisper_launcher.json'})")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from launcher.shards.upload import publish

    publish(Path(args.shards), args.repo, private=args.private, dry_run=args.dry_run)
    return 0


def _push(args: argparse.Namespace) -> int:
    from launcher.push import push

    push(Path(args.folder), args.repo, private=args.private, revision=args.revision, dry_run=args.dry_run)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from launcher.demo import run_demo

    return run_demo(Path(args.out), workers=args.workers, max_steps=args.max_steps)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe fields as train_ds.py does, e.g. --set optim.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shard", help="corpus -> Whisper log-mel WebDataset shards",
                       description="Decode, resample to 16 kHz, compute Whisper log-mel once and write WebDataset "
                                   "tar shards plus index.json; bad clips are dropped and listed in dropped.jsonl. "
                                   "A rerun resumes: finished shards are verified by sha256 and kept.")
    p.add_argument("--lang", required=True, help="language code, e.g. fr (Common Voice locale), or several: fr,de,es "
                                                 "(one folder each under --out)")
    p.add_argument("--source", help="cv11 (default: Common Voice 11 on the Hub, needs HF_TOKEN), cv-hub:LOCATION, "
                                    "cv:PATH, hf:NAME_OR_PATH, manifest:FILE.jsonl, or a path recognised by content")
    p.add_argument("--stage", help="with a URL --out: the local folder the set is written in before each shard is "
                                   "sent (default: shards-staging/<the URL's path>); rerun to resume")
    p.add_argument("--out", help="output folder or URL (s3://, gs://, az://, ...; default: shards/<lang>); with "
                                 "several languages their parent "
                                 "(default: shards/, giving shards/fr, shards/de, ...)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="feature processes (default: all cores; 0 runs in this process)")
    p.add_argument("--shard-size", type=float, default=256.0, help="target shard size in MB (default: 256)")
    p.add_argument("--n-mels", type=int, default=80, help="80 for Whisper v1/v2 models, 128 for large-v3")
    p.add_argument("--splits", help="comma-separated subset of train,validation,test (default: all present)")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    p.add_argument("--hf-config", help="configuration (subset) of a Hugging Face dataset source")
    p.add_argument("--audio-column", help="audio column of a Hugging Face dataset (default: its Audio feature)")
    p.add_argument("--text-column", help="text column of a Hugging Face dataset (default: sentence, text, ...)")
    p.set_defaults(func=_shard)

    p = sub.add_parser("inspect", help="summarise shards; --verify checks every sha256")
    p.add_argument("shards", help="folder or URL holding index.json, e.g. shards/fr or s3://bucket/fr")
    p.add_argument("--verify", action="store_true", help="check every shard's size and sha256 against index.json")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("validate", help="check a recipe; print it resolved, its DeepSpeed config and a memory "
                                        "estimate")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/large_fr.yaml")
    _add_overrides(p)
    p.add_argument("--world-size", type=int, default=8, help="GPUs in the job (default: 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default: 1)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("doctor", help="preflight: versions, driver, GPUs, DeepSpeed ops, model, shards, disk (and, "
                                      "under a launcher, the run folder and code on every rank)",
                       description="One line per check: OK, WARN or FAIL with the fix; exit 1 when a check failed. "
                                   "Started by a launcher (WORLD_SIZE > 1, e.g. `deepspeed --no_local_rank --module "
                                   "launcher doctor ...`), every rank also checks that it sees the run folder rank 0 "
                                   "writes and runs the same code, libraries, recipe and shards index.")
    p.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/large_fr.yaml")
    _add_overrides(p)
    p.add_argument("--world-size", type=int, help="GPUs in the job, for the DeepSpeed config and memory estimate "
                                                  "(default: the launcher's WORLD_SIZE, else the GPUs here)")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256 (reads every shard)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    p.set_defaults(func=_doctor)

    p = sub.add_parser("evaluate", help="WER of a model on a split of the shards, scored as the event scored it",
                       description="Greedy decoding with the language token forced; WER after BasicTextNormalizer, "
                                   "references that normalise to nothing dropped. Runs on one process, or on every "
                                   "rank under `deepspeed --module launcher evaluate ...` / `torchrun -m`.")
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. runs/large_fr/best) or hub id")
    p.add_argument("--shards", required=True, nargs="+",
                   help="folder or URL holding index.json; several (one per language) score each with its own language")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32, help="clips decoded at once per process (default: 32)")
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy, the event's rule")
    p.add_argument("--max-new-tokens", type=int, default=225)
    p.add_argument("--max-samples", type=int, help="only the first N clips of the split")
    p.add_argument("--language", help="default: the shards' language from index.json (one folder only)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                   help="the task token forced after the language (default: transcribe)")
    p.add_argument("--out", help="report folder (default: eval/<model>/ in the current directory)")
    p.add_argument("--zero-stage", type=int, choices=(0, 2, 3), default=0,
                   help="wrap the model in DeepSpeed ZeRO-2/3 as in training (weights gathered once)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--long-form", type=float, metavar="SECONDS",
                   help="score recordings of up to SECONDS joined from the split's clips (one speaker's, in order, "
                        "0.5 s of silence between them), decoded long-form with timestamps; report <split>-long-Ns")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    p.set_defaults(func=_evaluate)

    from launcher.launch import DEFAULT_MASTER_PORT, MODES  # stdlib only: cheap enough for every command

    p = sub.add_parser("launch", help="print (or --run) the DeepSpeed command for one node, many nodes or SLURM",
                       description="Print the exact DeepSpeed command(s) that start training in the chosen mode "
                                   "(train_ds.py where the current folder has it, else --module launcher.train), "
                                   "or run them with --run. single: this machine; hostfile: every node from here "
                                   "through pdsh/ssh; per-node: one command per node (--no_ssh --node_rank I); "
                                   "slurm: an sbatch script. Multi-node modes write HF_*, WANDB_*, NCCL_*, "
                                   "TRANSFORMERS_* and PYTHONPATH to .deepspeed_env (mode 0600) for the other nodes; "
                                   "values are never printed.")
    p.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/large_fr.yaml")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    p.add_argument("--mode", choices=MODES, default="single",
                   help="single (default): this machine; hostfile: DeepSpeed reaches the nodes via pdsh/ssh; "
                        "per-node: one command to run on each node; slurm: an sbatch script")
    p.add_argument("--hostfile", help="hostfile, one `HOSTNAME slots=GPUS` line per node (hostfile, per-node)")
    p.add_argument("--num-gpus", type=int, help="GPUs to use: single (default: all here, or 1), slurm (per node)")
    p.add_argument("--node-rank", type=int, help="per-node: only this node's command (0 = first host); needed "
                                                  "with --run")
    p.add_argument("--master-addr", help="address of node 0 reachable from every node (default: first host of "
                                         "the hostfile)")
    p.add_argument("--master-port", type=int, help="rendezvous port on node 0 (default: one free there when node 0 "
                                                    f"is this machine, else a random one above {DEFAULT_MASTER_PORT};"
                                                    " slurm: one derived from the job id)")
    p.add_argument("--launcher", help="hostfile mode: DeepSpeed's multi-node launcher: pdsh (default, over ssh), "
                                      "openmpi, mpich, impi, mvapich, slurm")
    p.add_argument("--nodes", type=int, help="slurm: nodes to allocate")
    p.add_argument("--cpu-ranks", type=int, help="slurm: ranks per node on a CPU partition (no GPU asked for; "
                                                 "DeepSpeed's CPU accelerator), instead of --num-gpus")
    p.add_argument("--partition", help="slurm: #SBATCH --partition")
    p.add_argument("--time", help="slurm: #SBATCH --time, e.g. 24:00:00")
    p.add_argument("--write", metavar="FILE", help="slurm: write the sbatch script to FILE instead of stdout")
    p.add_argument("--run", action="store_true", help="run the command instead of printing it (slurm: sbatch it)")
    p.set_defaults(func=_launch)

    p = sub.add_parser("export", help="a delivered model for deployment: CTranslate2 (faster-whisper)",
                       description="Convert a run's final/ (or any Hugging Face Whisper folder) with CTranslate2's "
                                   "converter, copying the tokenizer and preprocessor config faster-whisper needs and "
                                   "the decoding the model was scored with (whisper_launcher.json, README.md).")
    p.add_argument("model", help="a run folder (its final/ is exported) or a Hugging Face model folder")
    p.add_argument("--format", default="ct2", choices=["ct2"], help="ct2: CTranslate2 / faster-whisper")
    p.add_argument("--quantization", default="float16", choices=QUANTIZATIONS,
                   help="weights' type (default float16 for GPUs; int8 for CPUs)")
    p.add_argument("--out", help="default: RUN/export/final-ct2-<quantization>, or beside the model folder")
    p.set_defaults(func=_export)

    p = sub.add_parser("push", help="upload a delivered model (or an export) to the Hugging Face Hub",
                       description="Upload a run's final/ (or an export folder) with its model card; the token from "
                                   "HF_TOKEN or `hf auth login`, never printed. Rerun to resume an interrupted upload.")
    p.add_argument("folder", help="a run folder (its final/ is pushed), a model folder or an export folder")
    p.add_argument("--repo", required=True, help="OWNER/NAME on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--dry-run", action="store_true", help="list the files and show the card; upload nothing")
    p.set_defaults(func=_push)

    p = sub.add_parser("publish", help="send a shard set to a dataset repository on the Hugging Face Hub",
                       description="Upload a finished shard set (a folder) with a dataset card (language, source and "
                                   "licence, feature settings, hours and clips per split, drops, sha256); index.json "
                                   "last. The token from HF_TOKEN or `hf auth login`, never printed.")
    p.add_argument("shards", help="folder holding index.json, e.g. shards/fr")
    p.add_argument("--repo", required=True, help="OWNER/NAME of the dataset repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="list the files and show the card; upload nothing")
    p.set_defaults(func=_publish)

    p = sub.add_parser("demo", help="the whole flow on the small bundled corpus, on the CPU")
    p.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, help="train this many steps instead of the recipe's 120, without "
                                                 "periodic evaluation (a quicker look at the flow)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.func in (_evaluate, _doctor):  # what ranks of a multi-node job run: they read the job's secrets
            from launcher.launch.envfile import load_secrets

            load_secrets()
        return args.func(args)
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
