"""`launcher doctor`: every check that runs on a CPU, passing and failing, and the distributed checks on real gloo
ranks made to differ for real (another working directory, another --set)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from launcher import doctor
from launcher.cli import main
from launcher.doctor import Check, Gpu
from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.load import load_recipe
from launcher.shards.format import FORMAT
from launcher.testing.commands import run_ranks as run_cli_ranks
from launcher.testing.ranks import Rank
from tests.conftest import REPO

NAMES = ["versions", "driver", "gpus", "deepspeed-ops", "flash-attn", "model", "shards", "disk"]


def make_shards(folder: Path, n_mels: int = 80) -> Path:
    """index.json written to the shard contract, over random-byte tar files: the doctor reads no shard's content
    (only its size, and its sha256 with --verify), and this takes milliseconds where sharding audio takes ~25 s."""
    splits = {}
    for split, count in (("train", 3), ("validation", 1), ("test", 1)):
        (folder / split).mkdir(parents=True)
        entries = []
        for i in range(count):
            data = os.urandom(2000 + i)
            rel = f"{split}/{split}-{i:06d}.tar"
            (folder / rel).write_bytes(data)
            entries.append({"path": rel, "samples": 4, "seconds": 9.0, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"samples": 4 * count, "seconds": 9.0 * count, "dropped": 0, "shards": entries}
    index = {"format": FORMAT, "splits": splits, "dropped": {},
             "features": {"n_mels": n_mels, "sampling_rate": 16000, "n_fft": 400, "hop_length": 160,
                          "dtype": "float16", "frames": 3000},
             "source": {"kind": "test", "location": "-", "language": "fr"}}
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


@pytest.fixture
def recipe_file(tmp_path: Path, tiny_model: Path) -> Path:
    """tiny_demo.yaml pointed at the tiny model, fresh shards and a run folder under tmp_path."""
    raw = yaml.safe_load((REPO / "recipes" / "tiny_demo.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model)
    raw["data"]["shards"] = str(make_shards(tmp_path / "shards"))
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def doctor_cli(capsys, *args: str) -> tuple[int, dict[str, str]]:
    """`python -m launcher doctor ARGS` in this process (the imports are paid once); exit code and each line
    by check name."""
    rc = main(["doctor", *args])
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line[:4].strip() in ("OK", "WARN", "FAIL", "SKIP")}
    return rc, lines


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# ---- one machine ---------------------------------------------------------------------------------------------

def test_good_recipe_passes_every_check_and_exits_0(recipe_file, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rc, lines = doctor_cli(capsys, "--recipe", str(recipe_file))
    assert rc == 0, lines
    assert list(lines) == NAMES
    assert all(lines[n].startswith("OK ") for n in NAMES if n != "flash-attn"), lines
    assert lines["flash-attn"].startswith("SKIP")
    assert "torch.optim.AdamW" in lines["deepspeed-ops"] and "processor and weights present" in lines["model"]
    assert "all 5 files present" in lines["shards"] and "3 checkpoints" in lines["disk"]


def test_recipe_that_does_not_load_exits_2(tmp_path, capsys):
    assert main(["doctor", "--recipe", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bf16_recipe_on_a_cpu_only_machine_fails_with_the_fp32_fix(recipe_file, capsys, monkeypatch):
    recipe = load_recipe(recipe_file, ["deepspeed.precision=bf16"])
    check = doctor.check_gpus(recipe, [], accelerator_env="cpu")
    assert check.status == "FAIL" and "'bf16'" in check.message and "deepspeed.precision=fp32" in check.fix
    if torch.cuda.is_available():
        pytest.skip("the command-line half needs a machine without a GPU")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rc, lines = doctor_cli(capsys, "--recipe", str(recipe_file), "--set", "deepspeed.precision=bf16")
    assert rc == 1 and lines["gpus"].startswith("FAIL") and "-> fix:" in lines["gpus"]
    assert all(not lines[n].startswith("FAIL") for n in NAMES if n != "gpus"), lines


def test_cpu_run_asks_for_ds_accelerator_cpu(recipe_file):
    recipe = load_recipe(recipe_file)
    assert doctor.check_gpus(recipe, [], accelerator_env="cpu").status == "OK"
    unset = doctor.check_gpus(recipe, [], accelerator_env=None)
    assert unset.status == "WARN" and unset.fix == "export DS_ACCELERATOR=cpu"
    assert doctor.check_gpus(recipe, [], accelerator_env="cuda").status == "FAIL"


def test_bf16_needs_ampere_and_the_memory_estimate_must_fit(recipe_file):
    recipe = load_recipe(recipe_file, ["deepspeed.precision=bf16"])
    v100, a100 = Gpu("Tesla V100-SXM2-32GB", 32.0, (7, 0)), Gpu("NVIDIA A100-SXM4-40GB", 40.0, (8, 0))
    old = doctor.check_gpus(recipe, [v100, v100])
    assert old.status == "FAIL" and "Tesla V100" in old.message and "precision=fp16" in old.fix
    assert doctor.check_gpus(recipe, [a100] * 8).status == "OK"
    assert "8 x NVIDIA A100" in doctor.check_gpus(recipe, [a100] * 8).message
    tight = doctor.check_gpus(recipe, [a100], estimate_gib=45.0)
    assert tight.status == "WARN" and "45.0 GiB" in tight.message and "zero_stage=3" in tight.fix


@pytest.mark.parametrize("cuda, driver, status, hint", [
    ("13.0", "550.54.15", "FAIL", "whl/cu126"),  # CUDA 13 needs >= 580: the fix names a cu126 build
    ("12.6", "470.82.01", "FAIL", "whl/cu118"),
    ("12.6", "525.60.13", "OK", ""),
    ("13.0", "580.65.06", "OK", ""),
    (None, "550.54.15", "WARN", "whl/cu126"),  # GPUs here, but a CPU build of torch
    (None, None, "OK", ""),
    ("12.6", None, "OK", ""),  # a CUDA build on a machine without a GPU runs on the CPU
])
def test_driver_must_be_new_enough_for_torchs_cuda(cuda, driver, status, hint):
    check = doctor.check_driver(cuda, driver)
    assert check.status == status, check
    assert hint in check.fix and (status == "OK" or "TORCH_INDEX=" in check.fix)


def test_optimizer_class_is_what_deepspeed_builds():
    def config(params: dict, offload: bool = False, kind: str = "AdamW") -> dict:
        zero = {"stage": 2, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
        return {"optimizer": {"type": kind, "params": params}, "zero_optimization": zero}

    assert doctor.optimizer_class(config({"torch_adam": True})) == ("torch.optim.AdamW", None)
    assert doctor.optimizer_class(config({"torch_adam": True}, offload=True)) == ("torch.optim.AdamW", None)
    assert doctor.optimizer_class(config({})) == ("FusedAdam", "fused_adam")
    assert doctor.optimizer_class(config({}, offload=True)) == ("DeepSpeedCPUAdam", "cpu_adam")
    assert doctor.optimizer_class(config({}, kind="Lamb")) == ("FusedLamb", "fused_lamb")
    assert doctor.optimizer_class(config({}, kind="SGD")) == ("torch.optim.SGD", None)


def test_deepspeed_ops_check_reads_the_projects_config(recipe_file):
    recipe = load_recipe(recipe_file)
    cpu = doctor.check_deepspeed_ops(recipe, 2, on_gpu=False)
    assert cpu.status == "OK" and "torch.optim.AdamW" in cpu.message and "accelerator cpu" in cpu.message
    cls, op = doctor.optimizer_class(deepspeed_config(recipe, 2, on_gpu=True))
    gpu = doctor.check_deepspeed_ops(recipe, 2, on_gpu=True)
    assert cls in gpu.message
    assert (gpu.status == "OK") == (op is None), gpu  # an op not prebuilt here is never OK (WARN, or FAIL w/o nvcc)


def test_flash_attention_2_is_checked_only_when_asked(recipe_file):
    assert doctor.check_flash_attn(load_recipe(recipe_file), []).status == "SKIP"
    recipe = load_recipe(recipe_file, ["model.attn_implementation=flash_attention_2"])
    check = doctor.check_flash_attn(recipe, [])
    assert check.status == "FAIL" and "no GPU here" in check.message and "'fp32'" in check.message
    assert "attn_implementation=sdpa" in check.fix
    bf16 = load_recipe(recipe_file, ["model.attn_implementation=flash_attention_2", "deepspeed.precision=bf16"])
    turing = doctor.check_flash_attn(bf16, [Gpu("Tesla T4", 15.0, (7, 5))])
    assert turing.status == "FAIL" and "8.0" in turing.message


def test_model_folder_without_tokenizer_files_fails(recipe_file, tiny_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    check, config = doctor.check_model(load_recipe(recipe_file, [f"model.name_or_path={folder}"]))
    assert check.status == "FAIL" and "the folder has no tokenizer files" in check.message
    assert "save_pretrained" in check.fix
    assert "preprocessor_config.json" not in check.message and config["model_type"] == "whisper"
    good, _ = doctor.check_model(load_recipe(recipe_file))
    assert good.status == "OK"


def test_hub_model_not_in_the_cache_fails_at_once_offline(recipe_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(recipe_file, ["model.name_or_path=nobody-here/whisper-nowhere"])
    start = time.monotonic()
    check, config = doctor.check_model(recipe)
    assert time.monotonic() - start < 5 and config is None
    assert check.status == "FAIL" and "huggingface-cli download nobody-here/whisper-nowhere" in check.fix
    missing = doctor.check_model(load_recipe(recipe_file, [f"model.name_or_path={tmp_path}/absent/model"]))[0]
    assert missing.status == "FAIL" and "no folder" in missing.message


def test_missing_or_truncated_shard_fails_naming_the_file(recipe_file):
    recipe = load_recipe(recipe_file, ["data.on_bad_data=stop"])
    shards = Path(recipe.data.shards)
    (shards / "train" / "train-000001.tar").unlink()
    with open(shards / "validation" / "validation-000000.tar", "r+b") as f:
        f.truncate(100)
    check = doctor.check_shards(recipe)
    assert check.status == "FAIL" and "2 of 5 shard files wrong" in check.message, check
    assert "train/train-000001.tar" in check.message and "missing" in check.message
    assert "validation/validation-000000.tar" in check.message and "100 bytes" in check.message
    assert "test/" not in check.message and "inspect" in check.fix
    skipping = doctor.check_shards(load_recipe(recipe_file))  # data.on_bad_data: skip, the default
    assert skipping.status == "WARN" and "2 of 5 shard files wrong" in skipping.message
    assert "will be skipped" in skipping.message


def test_sha256_is_checked_only_with_verify(recipe_file):
    recipe = load_recipe(recipe_file, ["data.on_bad_data=stop"])
    path = Path(recipe.data.shards) / "test" / "test-000000.tar"
    path.write_bytes(os.urandom(path.stat().st_size))  # same size, other bytes
    assert doctor.check_shards(recipe).status == "OK"
    check = doctor.check_shards(recipe, verify=True)
    assert check.status == "FAIL" and "1 of 5" in check.message and "test/test-000000.tar" in check.message
    assert "sha256" in check.message


def test_shards_that_do_not_fit_the_recipe_fail(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file, [f"data.shards={make_shards(tmp_path / 'shards128', n_mels=128)}"])
    check = doctor.check_shards(recipe)
    assert check.status == "FAIL" and "n_mels=128" in check.message
    other_language = doctor.check_shards(load_recipe(recipe_file, ["model.language=de"]))
    assert other_language.status == "FAIL" and "model.language" in other_language.message


def test_disk_check_counts_kept_checkpoints_and_exports(recipe_file):
    recipe = load_recipe(recipe_file)  # fp32, keep_last 1, keep_best 1
    n = 1_000_000
    assert doctor.checkpoint_bytes(recipe, n, n) == 16 * n
    needed, _ = doctor.disk_needed(recipe, n, n)
    assert needed == 3 * 16 * n + 2 * 4 * n
    bf16 = load_recipe(recipe_file, ["deepspeed.precision=bf16", "checkpoint.keep_last=3"])
    assert doctor.disk_needed(bf16, n, n // 2)[0] == 5 * (2 * n + 12 * (n // 2)) + 2 * 2 * n
    assert doctor.check_disk(recipe, (n, n), free_bytes=needed - 1).status == "FAIL"
    assert doctor.check_disk(recipe, (n, n), free_bytes=needed + 1).status == "WARN"
    assert doctor.check_disk(recipe, (n, n), free_bytes=2 * needed).status == "OK"
    assert doctor.check_disk(recipe, None).status == "SKIP"


def test_too_little_disk_fails_the_local_preflight(recipe_file, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    checks = by_name(doctor.preflight_local(load_recipe(recipe_file), 1, free_bytes=1000))
    assert checks["disk"].status == "FAIL" and "keep_last 1 + keep_best 1 + 1 being written" in checks["disk"].message
    assert doctor.failed(list(checks.values()))
    assert "-> fix: free space" in doctor.render([checks["disk"]])


def test_a_login_node_skips_the_hardware_checks(recipe_file, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # would be a warning on this CPU-only machine
    checks = doctor.preflight_local(load_recipe(recipe_file, ["deepspeed.precision=bf16"]), 16, hardware=False)
    assert [c.name for c in checks] == NAMES and not doctor.failed(checks)
    assert {c.name for c in checks if c.status == "SKIP"} == {"driver", "gpus", "deepspeed-ops", "flash-attn"}


def test_a_difference_is_named_on_the_minority_ranks():
    values = [(0, "a", "x"), (1, "a", "x"), (2, "b", "y"), (3, "b", None)]
    assert doctor._odd_ones(values) == [(2, "b", "y")]
    assert doctor._odd_ones([(0, "a", "x"), (1, "b", "y")]) == [(1, "b", "y")]  # a tie: rank 0 is the reference
    assert doctor._odd_ones([(0, "a", None), (1, "b", "y")]) == []  # no git on a node is not a difference


# ---- many ranks ----------------------------------------------------------------------------------------------

def run_ranks(recipe: Path, ranks: list[dict], logs: Path, timeout: int = 150) -> list[tuple[int, str]]:
    """`python -m launcher doctor` once per rank, as launchers would start them on several nodes: RANK,
    WORLD_SIZE, LOCAL_RANK and the rendezvous in the environment, each in its own working directory (warm ranks:
    `launcher.testing.ranks`). Each rank's exit code and output."""
    specs = [Rank(cwd=spec["cwd"], argv=tuple(spec.get("args", ())), env={"LOCAL_RANK": str(spec["local_rank"])})
             for spec in ranks]
    done = run_cli_ranks("launcher", ["doctor", "--recipe", str(recipe)], ranks=specs, logs=logs, timeout=timeout,
                         check=False, stop_on_failure=False)
    return list(zip(done.codes, done.outputs, strict=True))


@pytest.mark.slow
def test_ranks_that_see_another_run_folder_or_recipe_fail_by_name(recipe_file, tmp_path):
    """Rank 1 starts in another directory (a node without the shared filesystem: the same relative output_dir
    is another folder there); rank 2 gets another --set. Each failure names exactly its rank."""
    raw = yaml.safe_load(recipe_file.read_text())
    raw["output_dir"] = "run"
    recipe_file.write_text(yaml.safe_dump(raw))
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    node_a.mkdir(), node_b.mkdir()
    results = run_ranks(recipe_file, [{"cwd": node_a, "local_rank": 0}, {"cwd": node_b, "local_rank": 0},
                                      {"cwd": node_a, "local_rank": 1, "args": ("--set", "optim.lr=1e-3")}],
                        tmp_path / "logs")
    assert [rc for rc, _ in results] == [1, 1, 1], results
    out = results[0][1]
    folder = next(line for line in out.splitlines() if " run-folder " in line)
    same = next(line for line in out.splitlines() if " same-code " in line)
    assert folder.startswith("FAIL") and "rank 1 on" in folder and "rank 2" not in folder, out
    assert "not on a filesystem every rank sees" in folder
    assert same.startswith("FAIL") and "recipe differs on rank 2 on" in same, out
    assert "code differs" not in same and "libraries differ" not in same and "rank 1" not in same
    assert "[all 2 nodes]" in out or "[rank" in out  # the local checks of both "nodes" are reported
    assert not list(node_a.glob("run/.doctor-*")) and not (node_b / "run").exists()
    assert all(" run-folder " not in o for _, o in results[1:])  # only rank 0 prints the report


@pytest.mark.slow
def test_two_ranks_on_one_machine_pass_the_distributed_checks(recipe_file, tmp_path):
    results = run_ranks(recipe_file, [{"cwd": REPO, "local_rank": 0}, {"cwd": REPO, "local_rank": 1}],
                        tmp_path / "logs")
    assert [rc for rc, _ in results] == [0, 0], results
    out = results[0][1]
    assert "read back by all 2 ranks on 1 host(s)" in out and "the same on all 2 ranks" in out, out
    assert "doctor: no check failed" in out and "[all" not in out  # one node: its checks once, without a tag
