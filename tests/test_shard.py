"""The shard step end to end, through the CLI: real MP3/WAV/FLAC decoding, real tars, every drop reported."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from launcher import audio, features
from launcher.testing.assets import second_language_corpus
from launcher.text import clean_transcript
from tests.conftest import DEMO, REPO, run_cli

EXPECTED_DROPS = {"bad_tsv_row": 1, "duplicate": 2, "empty_audio": 1, "empty_text": 1, "missing_audio": 1,
                  "too_long": 1, "unreadable_audio": 1}


def read_split(out: Path, index: dict, split: str) -> list[dict]:
    urls = [str(out / s["path"]) for s in index["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def test_cv_release_with_broken_clips_gives_correct_index_and_reports_every_drop(cv_release, tmp_path):
    out = tmp_path / "shards"
    proc = run_cli("shard", "--lang", "fr", "--source", f"cv:{cv_release}", "--out", str(out), "--workers", "2",
                   "--shard-size", "0.2")
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "whisper-shards/1"
    assert index["features"] == {**index["features"], "n_mels": 80, "sampling_rate": 16000, "n_fft": 400,
                                 "hop_length": 160, "dtype": "float16", "frames": 3000}
    assert index["source"]["kind"] == "cv" and index["source"]["language"] == "fr"
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 9, "validation": 4, "test": 3}
    assert index["dropped"] == EXPECTED_DROPS
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(EXPECTED_DROPS.values())
    assert {d["reason"] for d in dropped} == set(EXPECTED_DROPS)
    by_reason = {d["reason"]: d for d in dropped}
    assert "long.mp3" in by_reason["too_long"]["detail"] and "31.00 s" in by_reason["too_long"]["detail"]
    assert "garbage.mp3" in by_reason["unreadable_audio"]["detail"]
    assert "train.tsv line" in by_reason["bad_tsv_row"]["detail"]
    assert any("copy_of_test" == d["id"] and "in test" in d["detail"] for d in dropped)
    assert all(d["split"] == "train" for d in dropped)
    assert "dropped 8 clip(s)" in proc.stderr.replace("\n", " ")

    # every stored sample: float16 [80, t] unpadded, equal to the log-mel of the decoded audio
    for split in ("train", "validation", "test"):
        samples = read_split(out, index, split)
        assert len(samples) == index["splits"][split]["samples"]
        shard_meta = index["splits"][split]
        assert sum(s["samples"] for s in shard_meta["shards"]) == len(samples)
        assert abs(sum(json.loads(s["json"])["seconds"] for s in samples) - shard_meta["seconds"]) < 1e-3
        for s in samples:
            meta = json.loads(s["json"])
            mel = np.load(io.BytesIO(s["mel.npy"]), allow_pickle=False)
            assert mel.dtype == np.float16 and mel.shape[0] == 80
            pcm = audio.decode_audio((cv_release / "clips" / next(cv_release.glob(f"clips/{meta['id']}.*")).name)
                               .read_bytes())
            assert mel.shape[1] == features.n_frames(len(pcm))
            np.testing.assert_array_equal(mel, features.log_mel_spectrogram(pcm).astype(np.float16))
            assert meta["lang"] == "fr" and meta["text"] == clean_transcript(meta["text"])
    stereo = next(json.loads(s["json"]) for s in read_split(out, index, "train")
                  if json.loads(s["json"])["id"] == "stereo_44k")
    assert stereo["text"] == "Un son stéréo à 44,1 kHz." and stereo["seconds"] == pytest.approx(1.5, abs=1e-3)
    assert len(index["splits"]["train"]["shards"]) > 1, "shards are cut by --shard-size"
    assert all(s["bytes"] <= 0.2e6 or s["samples"] == 1 for s in index["splits"]["train"]["shards"])


def test_same_input_gives_byte_identical_shards_whatever_the_worker_count(cv_release, tmp_path):
    for workers, name in (("0", "a"), ("2", "b")):
        run_cli("shard", "--lang", "fr", "--source", str(cv_release), "--out", str(tmp_path / name),
                "--workers", workers, "--shard-size", "0.2")
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert a and a == b
    assert (tmp_path / "a" / "dropped.jsonl").read_text() == (tmp_path / "b" / "dropped.jsonl").read_text()
    index_a = json.loads((tmp_path / "a" / "index.json").read_text())
    index_b = json.loads((tmp_path / "b" / "index.json").read_text())
    assert index_a["splits"] == index_b["splits"]


def test_rerun_after_sigkill_resumes_and_matches_an_uninterrupted_run(bigger_corpus, tmp_path):
    args = ["--lang", "fr", "--source", f"cv:{bigger_corpus}", "--workers", "1", "--shard-size", "0.3"]
    run_cli("shard", *args, "--out", str(tmp_path / "reference"))
    reference = shard_bytes(tmp_path / "reference")
    assert len(reference) >= 5

    out = tmp_path / "interrupted"
    journal = out / ".journal" / "train.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "shard", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count('"shard"') >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    written = shard_bytes(out)
    assert 2 <= len(written) < len(reference)
    assert not (out / "index.json").exists()

    rerun = run_cli("shard", *args, "--out", str(out))
    assert "resuming train" in rerun.stderr
    assert shard_bytes(out) == reference
    assert (out / "dropped.jsonl").read_text() == (tmp_path / "reference" / "dropped.jsonl").read_text()
    assert not list(out.glob("*/*.tmp"))


def test_rerun_rewrites_a_corrupted_shard_and_keeps_the_verified_ones(cv_release, tmp_path):
    out = tmp_path / "shards"
    args = ["shard", "--lang", "fr", "--source", str(cv_release), "--out", str(out), "--shard-size", "0.2",
            "--workers", "0"]
    run_cli(*args)
    reference = shard_bytes(out)
    victim = out / "train" / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run_cli("inspect", str(out), "--verify", check=False)
    assert bad.returncode == 1 and "train/train-000001.tar" in bad.stdout and "sha256" in bad.stdout
    rerun = run_cli(*args)
    message = "resuming train: 1 finished shard(s) verified and kept, the next one failed"
    assert message in rerun.stderr.replace("\n", " ")
    assert shard_bytes(out) == reference
    assert run_cli("inspect", str(out), "--verify").returncode == 0


def test_rerun_with_other_settings_refuses_to_mix_shards(cv_release, tmp_path):
    out = tmp_path / "shards"
    run_cli("shard", "--lang", "fr", "--source", str(cv_release), "--out", str(out), "--workers", "0")
    proc = run_cli("shard", "--lang", "fr", "--source", str(cv_release), "--out", str(out), "--workers", "0",
                   "--n-mels", "128", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    run_cli("shard", "--lang", "fr", "--source", str(cv_release), "--out", str(out), "--workers", "0",
            "--n-mels", "128", "--overwrite")
    index = json.loads((out / "index.json").read_text())
    assert index["features"]["n_mels"] == 128
    sample = read_split(out, index, "test")[0]
    assert np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False).shape[0] == 128


def test_inspect_reports_hours_bytes_per_hour_and_drops(cv_release, tmp_path):
    out = tmp_path / "shards"
    run_cli("shard", "--lang", "fr", "--source", str(cv_release), "--out", str(out), "--workers", "0")
    proc = run_cli("inspect", str(out), "--verify")
    index = json.loads((out / "index.json").read_text())
    train = index["splits"]["train"]
    per_hour = sum(s["bytes"] for s in train["shards"]) / 1e6 / (train["seconds"] / 3600)
    assert f"{per_hour:.1f}" in proc.stdout
    assert "too_long 1" in proc.stdout and "verified 3 shards" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--source", "/nonexistent/folder"], "no such file or folder"),
    (["--n-mels", "64"], "--n-mels must be 80"),
    (["--splits", "train,holdout"], "holdout"),
])
def test_bad_arguments_fail_with_a_clear_message(cv_release, tmp_path, argv, message):
    args = ["shard", "--lang", "fr", "--source", str(cv_release), "--out", str(tmp_path / "o"), *argv]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_one_command_shards_several_languages_into_a_folder_each_with_one_table(tmp_path):
    """A release holding fr/ and es/ (`second_language_corpus`: 20 train clips): --lang fr,es writes OUT/fr and
    OUT/es, each index naming its language, and ends with one table of both."""
    root = tmp_path / "release"
    shutil.copytree(DEMO, root / "fr")
    second_language_corpus(root, "es")
    out = tmp_path / "shards"
    proc = run_cli("shard", "--lang", "fr,es", "--source", f"cv:{root}", "--out", str(out), "--workers", "0")
    indexes = {lang: json.loads((out / lang / "index.json").read_text()) for lang in ("fr", "es")}
    assert {lang: i["source"]["language"] for lang, i in indexes.items()} == {"fr": "fr", "es": "es"}
    assert indexes["es"]["splits"]["train"]["samples"] == 20
    assert indexes["fr"]["splits"]["train"]["samples"] == 44
    header = next(line for line in proc.stderr.splitlines() if "┃" in line)
    assert header.split("┃")[1].strip() == "language"
    rows = [line.split("│")[1].strip() for line in proc.stderr.splitlines() if "│" in line]
    assert rows == ["fr"] * 3 + ["es"] * 3, "one table of both languages"
    assert "fr: dropped 3 clip(s)" in " ".join(proc.stderr.split())
    for bad, message in ((["--lang", "fr,fr"], "each once"),
                         (["--lang", "fr,es", "--source", "manifest:x.jsonl"], "holds one language")):
        proc = run_cli("shard", *bad, "--out", str(tmp_path / "x"), check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
