"""Shard sets at a URL, read through fsspec exactly as from a folder: from a real S3-API server on loopback (moto's), a
Google Cloud Storage emulator, and from an HTTP server that injects faults (a connection dropped mid-shard, 503 then
success, a slow answer, bytes that do not match their sha256); `launcher shard --out s3://...`, a killed upload,
`inspect --verify` on a URL, the preflight's one line for a missing credential or an unreachable address, `publish
--dry-run`."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from launcher.errors import LauncherError
from launcher.shards import transfer
from launcher.shards.fetch import ShardFetcher
from launcher.shards.format import Shard, file_hashes, load_index
from launcher.shards.reader import BadShard, read_samples
from launcher.shards.upload import complete_remote_set
from launcher.testing.stores import Faults, environ, gcs_server, http_server, s3_server
from tests.conftest import DEMO, REPO, read_log, run_cli, run_training
from tests.conftest import run_overrides as base_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(demo_shards):
    """moto's S3 server with the demo set uploaded by the project's own upload (index.json last) to s3://sets/fr."""
    pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is part of `make setup`")
    with s3_server() as env, environ(env):
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}).mkdir("sets")
        complete_remote_set(demo_shards["shards"], "s3://sets/fr")
        yield env


def overrides(tiny_model, shards, run_dir: Path, *extra: str) -> list[str]:
    return base_overrides(tiny_model, shards, run_dir, "eval.test_at_end=false", "logging.every_steps=1",
                          "optim.warmup_steps=1", "logging.sample_ids=true", "data.num_workers=2", *extra)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


def sample_ids(run_dir: Path) -> dict[int, list]:
    out: dict[int, list] = {}
    for f in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        out[int(f.stem.split("-")[1])] = [json.loads(line)["ids"] for line in f.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def local_run(tiny_model, demo_shards, tmp_path_factory) -> Path:
    """The reference: 12 steps (two epochs and more) from the local folder, 2 ranks x 2 workers."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_training(overrides(tiny_model, demo_shards["shards"], run_dir, "optim.max_steps=12",
                           "checkpoint.every_steps=0"))
    return run_dir


def test_training_from_s3_killed_and_resumed_gives_the_local_folders_losses_and_samples(s3, tiny_model, local_run,
                                                                                        tmp_path):
    """Read through s3fs, SIGKILLed after a checkpoint and resumed: every loss bitwise and every sample id as the
    uninterrupted run from the local folder."""
    from tests.conftest import start_training

    run_dir = tmp_path / "run"
    args = overrides(tiny_model, "s3://sets/fr", run_dir, "optim.max_steps=12", "checkpoint.every_steps=3")
    with start_training(args, env=s3) as job:
        deadline = time.monotonic() + 300
        while not ((run_dir / "checkpoints" / "latest").is_file() and read_log(run_dir)[-1]["step"] >= 7):
            assert job.running and time.monotonic() < deadline
            time.sleep(0.05)
        job.kill(signal.SIGKILL)
        job.wait()
    assert read_log(run_dir)[-1]["step"] < 12
    run_training(args, extra=("--resume",), env=s3)
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, 13))
    assert losses(run_dir) == losses(local_run) and sample_ids(run_dir) == sample_ids(local_run)


def test_faults_over_https_are_retried_without_a_sample_repeated_or_lost(demo_shards, tiny_model, local_run,
                                                                       tmp_path):
    """The connection drops in the middle of two shards (twice each), another answers 503 three times, every answer
    is slowed: the run retries where it stopped and trains exactly as from the folder."""
    pytest.importorskip("aiohttp", reason="the http extra (aiohttp) is part of `make setup`")
    index = load_index(demo_shards["shards"])
    train = [Path(s.path).relative_to(demo_shards["shards"]).as_posix() for s in index.shards("train")]
    faults = Faults(drop_after={train[0]: 20_000, train[3]: 5_000}, drop_times=2, fail={train[1]: 3}, delay=0.01)
    with http_server(demo_shards["shards"], faults) as (url, served):
        run_dir = tmp_path / "run"
        proc = run_training(overrides(tiny_model, url, run_dir, "optim.max_steps=12", "checkpoint.every_steps=0"))
    assert losses(run_dir) == losses(local_run) and sample_ids(run_dir) == sample_ids(local_run)
    assert proc.output.count("retrying in") >= 4, proc.output[-3000:]
    assert served.dropped[train[0]] == served.dropped[train[3]] == 2 and served.fail[train[1]] == 0


def test_a_remote_shard_that_does_not_match_its_sha256_is_named_counted_and_skipped(demo_shards, tiny_model,
                                                                                   tmp_path):
    pytest.importorskip("aiohttp")
    index = load_index(demo_shards["shards"])
    bad = Path(index.shards("train")[2].path).relative_to(demo_shards["shards"]).as_posix()
    with http_server(demo_shards["shards"], Faults(corrupt={bad})) as (url, _):
        run_dir = tmp_path / "run"
        proc = run_training(overrides(tiny_model, url, run_dir, "optim.max_steps=8", "checkpoint.every_steps=0"))
        assert f"{url}/{bad} does not match its sha256" in proc.output
        assert sum(r["skipped_bad_samples"] for r in read_log(run_dir)) > 0 and read_log(run_dir)[-1]["step"] == 8
        assert run_cli("inspect", url, "--verify", check=False).returncode == 1


def small_pieces(shards: Path, out: Path, piece: int) -> Path:
    """A copy of a set whose index.json records pieces of `piece` bytes (the reader honours each shard's size)."""
    shutil.copytree(shards, out)
    index = json.loads((out / "index.json").read_text())
    for split in index["splits"].values():
        for entry in split["shards"]:
            entry["pieces"] = file_hashes(out / entry["path"], piece)[1].entry()
    (out / "index.json").write_text(json.dumps(index))
    return out


def first_train_shard(demo_shards, tmp_path: Path, piece: int) -> tuple[Path, Shard, str]:
    """A copy of the demo set with pieces of `piece` bytes: its folder, its first train shard, and that shard's path
    within the set (as the fault server names it)."""
    folder = small_pieces(demo_shards["shards"], tmp_path / "set", piece)
    shard = load_index(folder).shards("train")[0]
    return folder, shard, Path(shard.path).relative_to(folder).as_posix()


def end_of_samples(path: Path, n: int) -> int:
    """The byte where a tar's first `n` samples end."""
    with tarfile.open(path) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))[:n]
        return max(m.offset_data + m.size for m in tar.getmembers() if m.name.split(".")[0] in keys)


@pytest.mark.parametrize("process", [False, True], ids=["thread", "transfer-process"])
def test_a_remote_shard_is_read_as_its_bytes_arrive_each_piece_checked_first(demo_shards, tmp_path, process):
    """The server holds back the rest of a shard after its first two samples: they are read meanwhile, checked (a
    piece corrupted in flight is fetched again first); then the whole shard reads as the folder's. Transfers run in
    a thread (evaluation, verify) or in a process of their own (the training loader)."""
    pytest.importorskip("aiohttp")
    piece = 4096
    folder, shard, rel = first_train_shard(demo_shards, tmp_path, piece)
    expected = [(x.key, x.meta, x.mel) for x in read_samples(shard.path)]
    hold = (end_of_samples(shard.path, 2) // piece + 2) * piece
    assert hold < shard.bytes - 2 * piece, "the test needs a shard of more samples"
    faults = Faults(hold_from={rel: hold}, corrupt={rel: piece + 10}, corrupt_times=1)
    with http_server(folder, faults) as (url, served):
        remote = load_index(url).shards("train")[0]
        fetcher = ShardFetcher(prefetch=0, block=piece, process=process)
        file, early = fetcher.open(remote), []
        for sample in read_samples(file):
            early.append((sample.key, sample.meta, sample.mel))
            if len(early) == 2:
                break
        assert early == expected[:2] and file.download.ready < shard.bytes and not faults.release.is_set()
        assert served.corrupted[rel] == 1, "the corrupted piece was fetched again before it was read"
        faults.release.set()
        file.seek(0)
        assert [(x.key, x.meta, x.mel) for x in read_samples(file)] == expected
        fetcher.release(remote, file)
        fetcher.close()


@pytest.mark.parametrize("process", [False, True], ids=["thread", "transfer-process"])
def test_a_piece_that_never_matches_loses_the_samples_after_it_and_no_sample_before(demo_shards, tmp_path, process):
    pytest.importorskip("aiohttp")
    piece = 4096
    folder, shard, rel = first_train_shard(demo_shards, tmp_path, piece)
    expected = [x.key for x in read_samples(shard.path)]
    at = (end_of_samples(shard.path, 2) // piece + 1) * piece + 700  # in a piece of the third sample only
    with http_server(folder, Faults(corrupt={rel: at})) as (url, _):
        remote = load_index(url).shards("train")[0]
        fetcher = ShardFetcher(prefetch=0, block=piece, process=process)
        file, read = fetcher.open(remote), []
        with pytest.raises(BadShard, match=rf"does not match its sha256 in index.json \(piece {at // piece + 1} of "
                                           r"\d+, fetched twice\)") as error:
            for sample in read_samples(file, range(len(expected))):
                read.append(sample.key)
        fetcher.release(remote, file)
    assert read == expected[:2], "the samples before the bad piece, checked; none after it"
    assert error.value.skipped == len(expected) - len(read)


def test_a_killed_transfer_process_is_replaced_once_and_the_shard_goes_on_from_the_byte_reached(demo_shards, tmp_path,
                                                                                                  capfd):
    """The training loader's transfers run in a process of their own: killed mid-shard, a new one goes on from the
    last checked byte and the shard reads whole, as the folder's; killed again on the same shard, the shard is bad
    from there (named, the samples before it read)."""
    pytest.importorskip("aiohttp")
    piece = 4096
    folder, shard, rel = first_train_shard(demo_shards, tmp_path, piece)
    expected = [(x.key, x.meta, x.mel) for x in read_samples(shard.path)]
    hold = (end_of_samples(shard.path, 2) // piece + 2) * piece
    faults = Faults(hold_from={rel: hold})

    def kill_transfer(fetcher: ShardFetcher, download) -> None:
        process = fetcher._process
        process.proc.kill()
        deadline = time.monotonic() + 60
        while fetcher._process is process or not (download.restarted or download.finished):
            assert time.monotonic() < deadline, "the fetcher did not notice its transfer process end"
            time.sleep(0.02)

    with http_server(folder, faults) as (url, served):
        remote = load_index(url).shards("train")[0]
        fetcher = ShardFetcher(prefetch=0, block=piece, process=True)
        twice = fetcher.open(remote)
        samples = read_samples(twice)
        early = [next(samples).key, next(samples).key]
        kill_transfer(fetcher, twice.download)
        kill_transfer(fetcher, twice.download)
        with pytest.raises(BadShard, match=r"its transfer process ended twice \(exit code -9\) at byte \d+"):
            early.extend(x.key for x in samples)
        fetcher.release(remote, twice)
        assert early == [key for key, _, _ in expected[:2]]

        once = fetcher.open(remote)
        samples = read_samples(once)
        read = [next(samples), next(samples)]
        kill_transfer(fetcher, once.download)
        faults.release.set()
        read.extend(samples)
        assert [(x.key, x.meta, x.mel) for x in read] == expected
        reached = re.findall(r"the transfer process ended \(exit code -9\); fetching again from byte (\d+)",
                             capfd.readouterr().err)
        assert len(reached) == 2 and end_of_samples(shard.path, 2) <= int(reached[1]) <= hold, reached
        fetcher.release(remote, once)
        fetcher.close()


def test_a_transfer_process_whose_fetcher_is_gone_leaves_at_once_without_retrying(demo_shards, tmp_path):
    """A loader worker that ends (the end of a measurement, of an epoch without persistent workers) takes its read
    end of the answers with it while a transfer is under way: the transfer process leaves quietly, rather than
    taking the broken pipe for a network failure and retrying with warnings."""
    pytest.importorskip("aiohttp")
    folder = small_pieces(demo_shards["shards"], tmp_path / "set", 4096)
    with http_server(folder) as (url, _):
        shard = load_index(url).shards("train")[0]
        part = tmp_path / "shard.part"
        part.touch()
        proc = subprocess.Popen([sys.executable, "-m", "launcher.shards.transfer", "1"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the fetcher's end of the answers is gone; its end of the commands stays open
        pickle.dump(("start", 0, shard, str(part), 0, transfer.Settings(block=4096)), proc.stdin)
        proc.stdin.flush()
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
            proc.stdin.close()
        assert "retrying" not in proc.stderr.read().decode()


def test_a_set_without_pieces_is_checked_whole_before_it_is_read_and_bad_pieces_are_named(demo_shards, tmp_path):
    """A set sharded before pieces existed: each remote shard is checked against its sha256 before any of it is
    read (a wrong one gives no sample); an index.json whose pieces do not cover a shard is named."""
    pytest.importorskip("aiohttp")
    folder = tmp_path / "old"
    shutil.copytree(demo_shards["shards"], folder)
    index = json.loads((folder / "index.json").read_text())
    for split in index["splits"].values():
        for entry in split["shards"]:
            del entry["pieces"]
    (folder / "index.json").write_text(json.dumps(index))
    shard = load_index(folder).shards("train")[1]
    rel = Path(shard.path).relative_to(folder).as_posix()
    with http_server(folder, Faults(corrupt={rel})) as (url, _):
        remote = load_index(url).shards("train")
        fetcher, read = ShardFetcher(prefetch=1, block=4096), []
        fetcher.ahead(remote)
        file = fetcher.open(remote[0])
        assert [x.meta for x in read_samples(file)] == [x.meta for x in read_samples(load_index(folder).shards(
            "train")[0].path)]
        fetcher.release(remote[0], file)
        while not fetcher._jobs[remote[1].url].finished:  # its prefetch has failed before it is opened
            time.sleep(0.01)
        file = fetcher.open(remote[1])
        with pytest.raises(BadShard, match=r"does not match its sha256 in index.json \(fetched twice\)"):
            read.extend(x.key for x in read_samples(file))
        assert read == []
        fetcher.release(remote[1], file)
        fetcher.close()
    index["splits"]["train"]["shards"][0]["pieces"] = {"bytes": 4096, "sha256": ["0" * 64]}
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(LauncherError, match=r"index.json: shard train/train-000000.tar: 1 pieces of 4096 bytes do "
                                            r"not cover the shard's \d+ bytes"):
        load_index(folder).shards("train")


def test_the_cache_keeps_shards_for_later_epochs_within_its_bound(demo_shards, tmp_path):
    pytest.importorskip("aiohttp")
    shards = load_index(demo_shards["shards"]).shards("train")
    with http_server(demo_shards["shards"]) as (url, served):
        remote = load_index(url).shards("train")
        fetcher = ShardFetcher(tmp_path / "cache", cache_bytes=10**9, prefetch=2)
        fetcher.ahead(remote)
        first = [fetcher.local(s).read_bytes() for s in remote]
        fetcher.ahead(remote)
        again = [fetcher.local(s).read_bytes() for s in remote]
        assert first == again == [Path(s.path).read_bytes() for s in shards]
        assert set(served.requests.values()) == {1}, "each shard fetched once, then read from the cache"
        small = ShardFetcher(tmp_path / "small", cache_bytes=2 * max(s.bytes for s in shards), prefetch=0)
        for s in remote:
            small.local(s)
        assert sum(p.stat().st_size for p in (tmp_path / "small").glob("*.tar")) <= small.cache_bytes
        with pytest.raises(BadShard, match="no such file"):
            ShardFetcher(prefetch=0).local(type(remote[0])(f"{url}/train/absent.tar", 1, bytes=10))
    with pytest.raises(BadShard, match=r"absent.tar cannot be opened: FileNotFoundError"):  # a folder's, unverified
        ShardFetcher().open(type(shards[0])(tmp_path / "absent.tar", 1))


def test_shard_out_s3_uploads_index_last_and_a_killed_upload_is_not_a_set(s3, tiny_model, tmp_path):
    """`shard --out s3://...` SIGKILLed mid-upload leaves no index.json (not a set); run again, it completes the set,
    which inspect --verify accepts and training reads."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
    env = {**os.environ, **s3, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "launcher", "shard", "--lang", "fr", "--source", f"cv:{DEMO}", "--out",
           "s3://sets/up/fr", "--stage", str(tmp_path / "stage"), "--workers", "1", "--shard-size", "0.05"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not fs.glob("sets/up/fr/*/*.tar"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # uploads under way, more shards to come
    proc.wait()
    fs.invalidate_cache()
    assert not fs.exists("sets/up/fr/index.json"), "a set is whole only once index.json is there"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "uploaded: s3://sets/up/fr" in done.stderr
    fs.invalidate_cache()
    with environ(s3):
        index = load_index("s3://sets/up/fr")
        for split in index.split_names:
            for shard in index.shards(split):
                assert fs.info(shard.url)["size"] == shard.bytes
    inspect = run_cli("inspect", "s3://sets/up/fr", "--verify", env=s3)
    assert "all match index.json" in inspect.stdout
    run_dir = tmp_path / "run"
    run_training(overrides(tiny_model, "s3://sets/up/fr", run_dir, "optim.max_steps=3", "checkpoint.every_steps=0"),
                 env=s3)
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3]


def test_a_set_in_google_cloud_storage_is_uploaded_verified_and_streamed_as_the_folders(demo_shards, tmp_path):
    """gs:// through gcsfs, against Google's storage API emulated on loopback: the set uploaded as `shard --out` and
    `publish` upload (index.json last), `inspect --verify` on it, and every shard streamed through a transfer process
    reads as the folder's."""
    pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is part of `make setup`")
    pytest.importorskip("gcp_storage_emulator", reason="the test extra's GCS emulator is part of `make setup`")
    folder = demo_shards["shards"]
    with gcs_server("sets") as env, environ(env):
        complete_remote_set(folder, "gs://sets/fr")
        assert "all match index.json" in run_cli("inspect", "gs://sets/fr", "--verify", env=env).stdout
        local, remote = load_index(folder), load_index("gs://sets/fr")
        fetcher, read = ShardFetcher(prefetch=2, process=True), 0
        for split in local.split_names:
            fetcher.ahead(remote.shards(split))
            for here, there in zip(local.shards(split), remote.shards(split), strict=True):
                file = fetcher.open(there)
                samples = [(x.key, x.meta, x.mel) for x in read_samples(file)]
                assert samples == [(x.key, x.meta, x.mel) for x in read_samples(here.path)], there.url
                fetcher.release(there, file)
                read += len(samples)
        fetcher.close()
    assert read == sum(local.samples(split) for split in local.split_names)


def test_the_preflight_names_a_missing_credential_and_an_unreachable_address(s3, tiny_model, tmp_path):
    from launcher.testing.env import free_port

    recipe = str(REPO / "recipes" / "tiny_demo.yaml")
    no_keys = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-m", "launcher", "doctor", "--recipe", recipe, "--set",
                           f"model.name_or_path={tiny_model}", "data.shards=s3://sets/fr", "deepspeed.precision=fp32"],
                          cwd=tmp_path, env={**bare, **no_keys, "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
                                             "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                             "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
                                             "/nonexistent"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no AWS credentials" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    closed = f"http://127.0.0.1:{free_port()}/fr"
    proc = run_cli("validate", recipe, "--set", f"model.name_or_path={tiny_model}", f"data.shards={closed}",
                   check=False)
    assert proc.returncode == 2 and f"{closed}/index.json: cannot reach the address" in proc.stderr, proc.stderr


def test_publish_dry_run_lists_the_set_and_a_card_the_hubs_parser_reads(demo_shards):
    from huggingface_hub import DatasetCard

    proc = run_cli("publish", str(demo_shards["shards"]), "--repo", "someone/whisper-fr-shards", "--dry-run",
                   env={"HF_TOKEN": "hf_PLANTEDpublish42"})
    assert "would upload" in proc.stdout and "hf_PLANTEDpublish42" not in proc.stdout + proc.stderr
    card_text = proc.stdout.split("dataset card (README.md):\n", 1)[1]
    card = DatasetCard(card_text)
    assert card.data.language == ["fr"] and card.data.license == "cc0-1.0"
    assert card.data.task_categories == ["automatic-speech-recognition"]
    index = load_index(demo_shards["shards"])
    for split in index.split_names:
        assert f"| {split} | {index.samples(split):,} |" in card.content
        for shard in index.shards(split):
            assert shard.sha256 in card.content
    listed = {line.split()[0] for line in proc.stdout.split("dataset card")[0].splitlines() if line.startswith("  ")}
    assert "index.json" in listed and len([n for n in listed if n.endswith(".tar")]) == sum(
        len(index.shards(s)) for s in index.split_names)
    assert Counter(n.split("/")[0] for n in listed if n.endswith(".tar")) == {
        s: len(index.shards(s)) for s in index.split_names}


def test_doctor_verify_hashes_a_remote_sets_shards_and_names_a_corrupt_one(s3, tiny_model, demo_shards):
    """`doctor --verify` on a set at a URL fetches and hashes every shard it reads, as `inspect --verify` does."""
    import s3fs

    from launcher.doctor.files import check_shards
    from launcher.recipe.load import load_recipe

    def check(url: str):
        recipe = load_recipe(REPO / "recipes" / "tiny_demo.yaml", [f"model.name_or_path={tiny_model}",
                                                                    f"data.shards={url}", "deepspeed.precision=fp32"])
        with environ(s3):
            return check_shards(recipe, verify=True)

    good = check("s3://sets/fr")
    assert good.status == "OK" and "sizes and sha256" in good.message, good
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
    complete_remote_set(demo_shards["shards"], "s3://sets/bad")
    train = load_index(demo_shards["shards"]).shards("train")[0]
    name = Path(train.path).relative_to(demo_shards["shards"]).as_posix()
    data = bytearray(fs.cat_file(f"sets/bad/{name}"))
    data[-1] ^= 0xFF  # same size, other bytes
    fs.pipe_file(f"sets/bad/{name}", bytes(data))
    bad = check("s3://sets/bad")
    # the tiny recipe trains on without a bad shard (data.on_bad_data: skip): a warning that names it
    assert bad.status == "WARN" and f"{name} does not match its sha256" in bad.message, bad
