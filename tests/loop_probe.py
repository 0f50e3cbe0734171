"""Run by tests/test_loop.py: the real training loop (`launcher.train.main`) in this process as a world of one
(gloo), counting what the project's own code makes wait: collectives it issues, and tensor-to-Python reads
(`.item()`, `float(t)`, `bool(t)`, ...), each counted only when called from a `launcher` module. Also records the
live model's `use_cache` and generation config around every export of the best model.

Usage: python tests/loop_probe.py OUT.json -- --recipe R --set ...   (MASTER_PORT must be set)
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter", "barrier",
               "gather", "all_gather_object", "gather_object", "broadcast_object_list")
READS = ("item", "tolist", "__bool__", "__float__", "__int__")
counts = {"collectives": 0, "reads": 0}
exports: list[dict] = []


def from_launcher(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("launcher.")


def counting(kind: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if from_launcher():
            counts[kind] += 1
        return fn(*args, **kwargs)
    return wrapper


def main(out: str, argv: list[str]) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name in COLLECTIVES:
        setattr(dist, name, counting("collectives", getattr(dist, name)))
    for name in READS:
        setattr(torch.Tensor, name, counting("reads", getattr(torch.Tensor, name)))

    import launcher.train
    import launcher.training.periodic

    export = launcher.training.periodic.export_hf

    def watched_export(engine, *args, **kwargs):
        live = engine.module
        before = (live.config.use_cache, live.generation_config.to_json_string())
        result = export(engine, *args, **kwargs)
        exports.append({"use_cache_before": before[0], "use_cache_after": live.config.use_cache,
                        "generation_config_unchanged": before[1] == live.generation_config.to_json_string()})
        return result

    launcher.training.periodic.export_hf = watched_export
    code = launcher.train.main(argv)
    with open(out, "w") as f:
        json.dump({"code": code, **counts, "exports": exports}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[sys.argv.index("--") + 1:])
