"""`python -m launcher evaluate`: a Hugging Face model (folder or hub id) on one split of each shards folder, on one
process or on every rank of a `deepspeed`/`torchrun` launch (optionally under ZeRO-3, as during training)."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.distributed import init_distributed, shutdown_distributed
from launcher.errors import LauncherError
from launcher.evaluation.items import scan_split
from launcher.evaluation.longform import split_name
from launcher.evaluation.reports import default_report_dir, split_label, write_mean_report
from launcher.evaluation.run import clips_on_rank, evaluate
from launcher.model import DTYPES, DecodeSettings
from launcher.shards.format import load_index
from launcher.shards.location import Location


def run_standalone(model_name: str, shards_dirs: list[Path | str], split: str, *, batch_size: int, num_beams: int,
                   max_new_tokens: int, max_samples: int | None, language: str | None, task: str,
                   out_dir: Path | None, zero_stage: int, precision: str,
                   long_form: float | None = None) -> dict[str, dict] | None:
    """Load a Hugging Face model (folder or hub id) and evaluate it on one split of each shards folder (one per
    language, each decoded with its own language token), on one process or on every rank of a
    `deepspeed`/`torchrun` launch (optionally wrapped in ZeRO-2/3, as during training); with `long_form` on
    recordings of up to that many seconds joined from the split's clips. Returns {language: report} on rank 0."""
    import os

    import torch.distributed as dist
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from launcher.console import progress_bar, quiet_libraries

    indexes = [load_index(folder) for folder in shards_dirs]  # (--language with several folders: the CLI refuses)
    languages = [language or index.language for index in indexes]
    for folder, lang in zip(shards_dirs, languages, strict=True):
        if not lang:
            raise LauncherError(f"--language is needed: {Location.of(folder).join('index.json')} does not name "
                                "the shards' language")
    if len(set(languages)) < len(languages):
        raise LauncherError(f"--shards: two folders of one language ({', '.join(languages)}): one per language")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    quiet_libraries(rank, verbose=False)
    on_gpu = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        init_distributed(on_gpu)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = DTYPES[precision]
    if not on_gpu and dtype != torch.float32:
        raise LauncherError(f"--precision {precision} needs a GPU; use --precision fp32 on the CPU")
    try:
        processor = WhisperProcessor.from_pretrained(model_name)
        model = WhisperForConditionalGeneration.from_pretrained(model_name, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:  # a missing folder is reported as a malformed hub id (ValueError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LauncherError(f"--model {model_name}: cannot load a Whisper model and processor ({first})") from None
    if zero_stage == 3:
        import deepspeed

        # the weights partitioned as ZeRO-3 training holds them, so this path is the one periodic evaluation takes;
        # no optimizer: nothing is trained (ZeRO-2 partitions only optimizer state and gradients: its weights are
        # whole on every rank, the plain model)
        config = {"train_micro_batch_size_per_gpu": batch_size, "zero_optimization": {"stage": zero_stage},
                  "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}
        model = deepspeed.initialize(model=model, config=config)[0].module
    model.to(device)
    reports = {}
    for index, lang in zip(indexes, languages, strict=True):
        settings = DecodeSettings(language=lang, task=task, batch_size=batch_size, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens)
        items = scan_split(index, split, max_samples)
        mine = clips_on_rank(items, world, rank, long_form)
        label = split_label(split, lang, len(indexes) > 1)
        name = split_name(label, long_form) if long_form else label
        with progress_bar(name + (f" (rank 0 of {world})" if world > 1 else ""), mine, "clips",
                          enabled=rank == 0) as advance:
            reports[lang] = evaluate(model, processor.tokenizer, items, settings, split=label, device=device,
                                     dtype=dtype, out_dir=out_dir or default_report_dir(model_name),
                                     model_name=model_name, progress=advance, long_form=long_form)
    shutdown_distributed()
    if rank != 0:
        return None
    if len(reports) > 1:
        write_mean_report(out_dir or default_report_dir(model_name), split, None, reports)
    return reports
