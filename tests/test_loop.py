"""The training loop waits for nothing per step: the project's own code issues collectives and reads tensors back
to Python only at sync steps (logging steps, at most SYNC_EVERY apart), and exporting the best model leaves the
live model's settings alone. Measured on the real loop (tests/loop_probe.py); batches are collated in a loader
worker, as in training, so the loader's own host-side work is not counted."""

from __future__ import annotations

import json

import pytest

from launcher.testing.commands import run_ranks
from launcher.training.step import SYNC_EVERY

pytestmark = pytest.mark.slow


def probe(tiny_model, shards, tmp_path, steps: int) -> dict:
    out = tmp_path / f"probe-{steps}.json"
    sets = [f"model.name_or_path={tiny_model}", f"data.shards={shards}", f"output_dir={tmp_path / f'run-{steps}'}",
            f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.grad_accum=2", "data.num_workers=1",
            "data.batch_size_per_gpu=1",  # counts, not compute: the smallest batch
            f"logging.every_steps={steps}", f"eval.every_steps={steps}", "eval.max_samples=2",
            "eval.max_new_tokens=4", "eval.test_at_end=false", "checkpoint.every_steps=0", "checkpoint.keep_best=1"]
    run_ranks("tests/loop_probe.py", [str(out), "--", "--recipe", "recipes/tiny_demo.yaml", "--set", *sets], ranks=1,
              logs=tmp_path / f"logs-{steps}")
    result = json.loads(out.read_text())
    assert result["code"] == 0
    return result


def test_ten_more_steps_cost_one_collective_and_one_read(tiny_model, demo_shards, tmp_path):
    """12 and 22 steps, each logged and evaluated once at its end: the only difference the project's code makes is
    the sync at step 20 (one all-reduce carrying any stop request, one read of it). The 9 other steps add nothing:
    no finiteness all-reduce and no `.item()` per micro-batch, as there used to be."""
    short, long = (probe(tiny_model, demo_shards["shards"], tmp_path, steps) for steps in (12, 22))
    assert SYNC_EVERY == 10
    assert long["collectives"] - short["collectives"] == 1, (short, long)
    assert long["reads"] - short["reads"] == 1, (short, long)
    # exporting the best model (at the evaluation) and the final one leaves the live model as training needs it
    assert len(long["exports"]) == 2
    assert all(not e["use_cache_before"] and not e["use_cache_after"] and e["generation_config_unchanged"]
               for e in long["exports"]), long["exports"]
