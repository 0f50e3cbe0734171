"""Shared test helpers: real audio (bundled espeak-ng speech, synthesised tones) and corpora built from it."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Nothing in the suite may reach a hub: fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "launcher" / "assets" / "demo_corpus" / "fr"
CV_COLUMNS = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale",
              "segment"]


def demo_rows(split_file: str = "train.tsv") -> list[dict]:
    """Rows of the bundled demo corpus whose clips exist (the deliberately broken ones left out)."""
    with open(DEMO / split_file, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in rows if (DEMO / "clips" / r["path"]).is_file() and r["sentence"].strip()
            and not r["path"].startswith("common_voice_fr_9")]


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_tsv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, CV_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, escapechar="\\",
                           extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in CV_COLUMNS})


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: Path = REPO,
            **kw) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cv_release(tmp_path: Path) -> Path:
    """A Common Voice release folder with real speech and every kind of bad input the shard step must report.

    Expected result: train keeps 9, validation 4, test 3; dropped: too_long 1, unreadable_audio 1,
    empty_audio 1, missing_audio 1, empty_text 1, duplicate 2 (a repeated row, and test audio reused in
    train under another name), bad_tsv_row 1.
    """
    root = tmp_path / "cv" / "fr"
    clips = root / "clips"
    clips.mkdir(parents=True)
    rows = demo_rows()
    for r in rows[:14]:
        shutil.copy(DEMO / "clips" / r["path"], clips / r["path"])
    train, dev, test = rows[:8], rows[8:11], rows[11:14]
    # other rates, channel counts and containers than Common Voice's 48 kHz mono MP3
    sf.write(clips / "stereo_44k.wav", tone(1.5, 44100, channels=2), 44100)
    sf.write(clips / "mono_8k.flac", tone(2.0, 8000, freq=300), 8000)
    train.append({"path": "stereo_44k.wav", "sentence": "Un son  stéréo\u00a0à 44,1 kHz."})
    dev.append({"path": "mono_8k.flac", "sentence": "Un son à huit kilohertz."})
    # bad input, one of each kind
    sf.write(clips / "long.mp3", tone(31.0, 48000), 48000, format="MP3")
    (clips / "garbage.mp3").write_bytes(b"ID3 this is not an mp3 at all" * 50)
    (clips / "empty.mp3").write_bytes(b"")
    shutil.copy(clips / rows[11]["path"], clips / "copy_of_test.mp3")
    train += [{"path": "long.mp3", "sentence": "Beaucoup trop long."},
              {"path": "garbage.mp3", "sentence": "Fichier corrompu."},
              {"path": "empty.mp3", "sentence": "Fichier vide."},
              {"path": "absent.mp3", "sentence": "Fichier absent."},
              {"path": rows[0]["path"], "sentence": "\u200b  "},
              {"path": rows[1]["path"], "sentence": rows[1]["sentence"]},
              {"path": "copy_of_test.mp3", "sentence": "La même voix que dans le test."}]
    write_tsv(root / "train.tsv", train)
    write_tsv(root / "dev.tsv", dev)
    write_tsv(root / "test.tsv", test)
    with open(root / "train.tsv", "a", encoding="utf-8") as f:
        f.write("speaker_x\tonly_two_fields.mp3\n")
    return root


@pytest.fixture
def bigger_corpus(tmp_path) -> Path:
    """~150 distinct real-speech clips (demo clips at several gains), so a run takes a few seconds."""
    root = tmp_path / "big"
    (root / "clips").mkdir(parents=True)
    rows = []
    for gain_i, gain in enumerate((1.0, 0.9, 0.8, 0.7)):
        for r in demo_rows():
            pcm, rate = sf.read(DEMO / "clips" / r["path"], dtype="float32")
            name = f"g{gain_i}_{r['path'].replace('.mp3', '.wav')}"
            sf.write(root / "clips" / name, pcm * gain, rate)
            rows.append({"path": name, "sentence": r["sentence"]})
    write_tsv(root / "train.tsv", rows)
    write_tsv(root / "test.tsv", [])
    return root


def second_language_corpus(root: Path, language: str = "es", train_clips: int = 20) -> Path:
    """The demo corpus as another language's release: clips renamed (distinct ids), the first `train_clips` of
    train (a smaller set than French's 44), validation and test whole. The speech stays French: enough for
    mixing, labels and per-language reports, which never listen."""
    out = root / language
    (out / "clips").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        lines = (DEMO / name).read_text(encoding="utf-8").splitlines()
        keep = lines[: train_clips + 1] if name == "train.tsv" else lines
        (out / name).write_text("\n".join(line.replace("common_voice_fr_", f"common_voice_{language}_")
                                           for line in keep) + "\n", encoding="utf-8")
    for clip in (DEMO / "clips").iterdir():
        shutil.copy(clip, out / "clips" / clip.name.replace("common_voice_fr_", f"common_voice_{language}_"))
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    """The bundled corpus sharded once per session: 80 bins (shards) and 128 bins (shards128); and a second
    language's set (shards_es, 80 bins, `second_language_corpus`)."""
    from launcher.shard import ShardSettings, shard_corpus
    from launcher.sources.common_voice import CommonVoiceRelease

    root = tmp_path_factory.mktemp("demo_shards")
    out = {}
    for name, n_mels in (("shards", 80), ("shards128", 128)):
        shard_corpus(CommonVoiceRelease(DEMO, "fr"), root / name, ShardSettings(n_mels, 200_000, "fr"), workers=0)
        out[name] = root / name
    es = second_language_corpus(root / "corpus")
    shard_corpus(CommonVoiceRelease(es, "es"), root / "shards_es", ShardSettings(80, 200_000, "es"), workers=0)
    out["shards_es"] = root / "shards_es"
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Whisper with a tokenizer trained on the demo sentences (no download)."""
    from launcher.tiny_model import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("tiny") / "tiny-whisper")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict:
    """Environment for DeepSpeed on the CPU: gloo, one thread per rank (2 ranks share 2 cores)."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", **extra}


def deepspeed_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), *args]


def training_cmd(recipe_overrides: list[str], ranks: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """`deepspeed --num_gpus RANKS train_ds.py --recipe recipes/tiny_demo.yaml --set ...` on the CPU."""
    return deepspeed_cmd("--num_gpus", str(ranks), "--master_port", str(free_port()), "train_ds.py",
                         "--recipe", "recipes/tiny_demo.yaml", *extra, "--set", *recipe_overrides)


def run_training(recipe_overrides: list[str], *, ranks: int = 2, extra: tuple[str, ...] = (), timeout: int = 600,
                 check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = training_cmd(recipe_overrides, ranks, extra)
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


# The tests whose premise is how the tiny model's validation WER moves over a run (an earlier best step, transcripts
# of different lengths) were set up with the language token learnt, as every run learnt it before
# model.train_language_token (whose default masks it with one language)
LEARNT_LANGUAGE_TOKEN = "model.train_language_token=true"

# 8 clips (the demo's validation split), one step per epoch with 2 ranks x 4
SMALL_FIXED_SET = ("data.train_split=validation", "eval.max_new_tokens=20")


def run_overrides(tiny_model: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """Paths for a test run, no periodic evaluation unless `extra` asks for it (later --set values win)."""
    return [f"model.name_or_path={tiny_model}", f"data.shards={shards}", f"output_dir={run_dir}",
            "eval.every_steps=0", "checkpoint.keep_best=0", "checkpoint.keep_last=2", *extra]


@pytest.fixture(scope="session")
def zero2_run(tiny_model, demo_shards, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2, 120 steps on the 8 validation clips: a model that has learnt them, so that (unlike the random
    tiny model, which decodes the same tokens for everything) it decodes transcripts of different lengths for
    different clips. Its final/ serves the evaluation tests. Its language token is learnt (LEARNT_LANGUAGE_TOKEN)."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    run_training(run_overrides(tiny_model, demo_shards["shards"], run_dir, *SMALL_FIXED_SET, "optim.max_steps=120",
                               "checkpoint.every_steps=60", "logging.every_steps=10", LEARNT_LANGUAGE_TOKEN))
    return run_dir


def read_log(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
