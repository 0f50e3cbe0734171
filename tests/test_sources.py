"""Every corpus reader through the shard command: hub-layout tars, HF datasets, JSONL manifests."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from launcher.errors import LauncherError
from launcher.sources import CV11_HUB, open_source
from launcher.sources.common_voice import CommonVoiceHub
from tests.conftest import DEMO, demo_rows, run_cli, tone, write_tsv


def add_to_tar(tar_path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cv_hub_mirror(tmp_path) -> Path:
    """A folder laid out like mozilla-foundation/common_voice_11_0: transcript/fr/*.tsv, audio/fr/<split>/*.tar."""
    root = tmp_path / "cv11"
    (root / "transcript" / "fr").mkdir(parents=True)
    rows = demo_rows()
    clip = {r["path"]: (DEMO / "clips" / r["path"]).read_bytes() for r in rows[:12]}
    train, test = rows[:8], rows[8:12]
    write_tsv(root / "transcript" / "fr" / "train.tsv", [*train, {"path": "never_in_a_tar.mp3", "sentence": "Perdu."}])
    write_tsv(root / "transcript" / "fr" / "test.tsv", test)
    write_tsv(root / "transcript" / "fr" / "dev.tsv", [])
    for split, part, n_tars in (("train", train, 3), ("test", test, 1)):
        folder = root / "audio" / "fr" / split
        folder.mkdir(parents=True)
        for i in range(n_tars):
            members = {f"fr_{split}_{i}/{r['path']}": clip[r["path"]] for r in part[i::n_tars]}
            if split == "train" and i == 1:
                members["fr_train_1/stray.mp3"] = clip[test[0]["path"]][:-7]
            add_to_tar(folder / f"fr_{split}_{i}.tar", members)
    # the last train tar is cut short mid-member: its clips are reported, the run goes on
    last = root / "audio" / "fr" / "train" / "fr_train_2.tar"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return root


def test_cv_hub_layout_streams_tars_and_reports_what_is_missing(cv_hub_mirror, tmp_path):
    out = tmp_path / "shards"
    run_cli("shard", "--lang", "fr", "--source", f"cv-hub:{cv_hub_mirror}", "--out", str(out), "--workers", "0")
    index = json.loads((out / "index.json").read_text())
    assert index["source"]["kind"] == "cv-hub"
    assert set(index["splits"]) == {"train", "validation", "test"}
    assert index["splits"]["test"]["samples"] == 4
    assert index["splits"]["validation"]["samples"] == 0
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    reasons = [d["reason"] for d in dropped]
    assert reasons.count("no_transcript") == 1 and reasons.count("unreadable_tar") == 1
    # fr_train_2.tar held 2 clips: truncated mid-way, so 1 or 2 of them come back as missing_audio
    kept = index["splits"]["train"]["samples"]
    assert kept + reasons.count("missing_audio") == 8 + 1
    assert 5 <= kept <= 7
    assert any(d["id"] == "never_in_a_tar" and d["reason"] == "missing_audio" for d in dropped)
    # the bare folder is recognised as hub layout too
    assert isinstance(open_source(str(cv_hub_mirror), "fr"), CommonVoiceHub)


def test_default_source_is_common_voice_11_on_the_hub_with_advice_when_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LauncherError) as e:
        open_source(None, "fr")
    assert CV11_HUB in str(e.value) and "HF_TOKEN" in str(e.value) and "cv-hub:" in str(e.value)


def hf_parquet_dataset(root: Path) -> Path:
    """A local dataset in the hub's parquet layout (data/<split>-*.parquet), audio as {bytes, path} structs."""
    (root / "data").mkdir(parents=True)
    rows = demo_rows()
    features = {"audio": {"_type": "Audio"}, "sentence": {"dtype": "string", "_type": "Value"},
                "id": {"dtype": "string", "_type": "Value"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    for split, part in (("train", rows[:5]), ("validation", rows[5:7]), ("test", rows[7:9])):
        table = pa.table({
            "audio": [{"bytes": (DEMO / "clips" / r["path"]).read_bytes(), "path": r["path"]} for r in part],
            "sentence": [r["sentence"] for r in part],
            "id": [f"{split}-{i}" for i in range(len(part))],
        }).replace_schema_metadata(meta)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hf_parquet_dataset_through_the_shard_command(tmp_path):
    src = hf_parquet_dataset(tmp_path / "ds")
    out = tmp_path / "shards"
    run_cli("shard", "--lang", "fr", "--source", f"hf:{src}", "--out", str(out), "--workers", "0")
    index = json.loads((out / "index.json").read_text())
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 5, "validation": 2, "test": 2}
    assert index["source"]["kind"] == "hf" and index["source"]["text_column"] == "sentence"
    assert index["dropped"] == {}


def test_hf_audiofolder_with_custom_text_column(tmp_path):
    src = tmp_path / "af"
    for split, freq in (("train", 200.0), ("test", 300.0)):
        (src / split).mkdir(parents=True)
        sf.write(src / split / "a.wav", tone(1.0, 22050, freq=freq), 22050)
        sf.write(src / split / "b.flac", tone(0.7, 16000, freq=freq * 2, channels=2), 16000)
        (src / split / "metadata.csv").write_text(f"file_name,words\na.wav,un {split}\nb.flac,deux {split}\n")
    out = tmp_path / "shards"
    proc = run_cli("shard", "--lang", "fr", "--source", f"hf:{src}", "--out", str(out), "--workers", "0", check=False)
    assert proc.returncode == 2 and "--text-column" in proc.stderr
    run_cli("shard", "--lang", "fr", "--source", str(src), "--text-column", "words", "--out", str(out),
            "--workers", "0")
    index = json.loads((out / "index.json").read_text())
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 2, "test": 2}
    assert index["splits"]["test"]["seconds"] == pytest.approx(1.7, abs=1e-3)


def test_manifest_reports_bad_lines_by_number_and_reads_every_good_one(tmp_path):
    (tmp_path / "audio").mkdir()
    rows = demo_rows()[:4]
    for r in rows:
        shutil.copy(DEMO / "clips" / r["path"], tmp_path / "audio" / r["path"])
    sf.write(tmp_path / "audio" / "long.wav", np.zeros(16000 * 2, np.float32), 16000)
    lines = [json.dumps({"audio": f"audio/{rows[0]['path']}", "text": rows[0]["sentence"]}),
             json.dumps({"audio": str(tmp_path / "audio" / rows[1]["path"]), "text": rows[1]["sentence"],
                         "split": "test", "id": "absolute-path"}),
             json.dumps({"audio": f"audio/{rows[2]['path']}", "text": rows[2]["sentence"], "split": "dev"}),
             "{not json",
             json.dumps({"audio": f"audio/{rows[3]['path']}"}),
             json.dumps({"audio": "audio/x.wav", "text": "x", "split": "holdout"}),
             json.dumps({"audio": "audio/long.wav", "text": "stated too long", "duration": 42.0}),
             "",
             json.dumps({"audio": "audio/missing.wav", "text": "where is it"})]
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    run_cli("shard", "--lang", "fr", "--source", str(manifest), "--out", str(out), "--workers", "0")
    index = json.loads((out / "index.json").read_text())
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 1, "validation": 1, "test": 1}
    assert index["dropped"] == {"bad_manifest_line": 3, "missing_audio": 1, "too_long": 1}
    details = (out / "dropped.jsonl").read_text()
    for n in (4, 5, 6):
        assert f"corpus.jsonl line {n}:" in details
    assert "42.00 s stated" in details
