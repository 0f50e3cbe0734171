"""Run by tests/test_evaluate.py on 2 ranks under `deepspeed`: a ZeRO-3 engine holding a trained tiny Whisper,
then the evaluation's two phases on uneven items (2 clips on rank 0, 1 on rank 1), counting every torch.distributed
call each phase makes. Writes {phase: count} per rank to OUT/rank-R.json.

Usage: deepspeed --num_gpus 2 --no_local_rank tests/zero3_collectives.py MODEL SHARDS OUT
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from launcher.assets import DEMO_RECIPE
from launcher.distributed import contiguous_range, init_distributed
from launcher.evaluation.decode import transcribe
from launcher.evaluation.items import scan_split
from launcher.features import pad_batch, stack_features
from launcher.model import DecodeSettings, input_frames, materialize
from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.load import load_recipe
from launcher.shards.format import load_index

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "barrier",
               "gather", "scatter", "all_gather_object", "gather_object", "broadcast_object_list")
calls = {"phase": "setup", "counts": {}}


def counting(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls["counts"][calls["phase"]] = calls["counts"].get(calls["phase"], 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def main(model_dir: str, shards: str, out: str) -> None:
    for name in COLLECTIVES:  # before DeepSpeed's backend starts: it keeps references to some of these
        if hasattr(dist, name):
            setattr(dist, name, counting(name, getattr(dist, name)))
    init_distributed(False)
    rank, world = dist.get_rank(), dist.get_world_size()
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    recipe = load_recipe(DEMO_RECIPE, ["deepspeed.zero_stage=3"])  # ZeRO-3 as training configures it
    config = deepspeed_config(recipe, world, on_gpu=False, d_model=model.config.d_model)
    engine = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                       "zero_optimization": config["zero_optimization"]})[0]
    items = scan_split(load_index(Path(shards)), "validation", max_samples=3)
    mine = items[slice(*contiguous_range(len(items), world, rank))]
    settings = DecodeSettings(language="fr", batch_size=1, max_new_tokens=20)
    calls["phase"] = "materialize"
    plain = materialize(engine.module, torch.device("cpu"), torch.float32)
    calls["phase"] = "transcribe"
    predictions = transcribe(plain, processor.tokenizer, mine, settings, torch.device("cpu"), torch.float32)
    tokens = [len(processor.tokenizer(p["prediction"], add_special_tokens=False).input_ids) for p in predictions]
    # the same decoding on the ZeRO-3 module itself, of the same clip on both ranks (anything else would deadlock):
    # its hooks gather weights at every forward, i.e. at every decoded token
    engine.module.eval()
    window = input_frames(engine.module.config)
    features = pad_batch(*stack_features([items[0].mel.load()], window), torch.float32, window=window)
    with torch.no_grad():
        calls["phase"] = "hooked"
        hooked = engine.module.generate(input_features=features, attention_mask=torch.ones(1, window),
                                        generation_config=settings.generation_config(engine.module))
    calls["phase"] = "done"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"counts": calls["counts"], "items": len(mine),
                                                             "tokens": tokens, "predictions": predictions,
                                                             "hooked_tokens": hooked.shape[-1]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
