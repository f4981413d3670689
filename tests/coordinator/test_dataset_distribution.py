"""A prepared dataset handed to peers over HTTP: the coordinator serves it, peers download the
shards they train on, check each against the signed manifest digest and keep a bounded cache."""

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from coordinator.cli import main as coordinator_main
from coordinator.server import DashboardServer
from model.prepared import (
    MANIFEST,
    Manifest,
    manifest_digest,
    read_shard,
    token_bytes_for,
    write_atomic,
    write_shards,
)
from model.tokenizer import load_tokenizer
from peer.dataset import DatasetError, RemoteDataset

SEQ_LEN = 32  # the tests' run configs (tests/conftest.py)


def prepared_dataset(folder: Path, shards: int = 8, sequences: int = 16) -> str:
    """A prepared dataset of random tokens for the run's tokenizer; returns its manifest's digest."""
    tokenizer = load_tokenizer()
    rows = np.random.default_rng(0).integers(0, tokenizer.vocab_size, (shards * sequences, SEQ_LEN))
    entries = write_shards(rows, folder, sequences, token_bytes_for(tokenizer.vocab_size))
    manifest = Manifest(SEQ_LEN, tokenizer.sha256, entries, documents=shards, tokens=shards * sequences * SEQ_LEN)
    write_atomic(folder / MANIFEST, manifest.to_json().encode())
    return manifest_digest(folder)


@pytest.fixture
def served(tmp_path):
    """A prepared dataset served as the coordinator serves it: (its /data/ address, folder, digest)."""
    folder = tmp_path / "prepared"
    digest = prepared_dataset(folder)
    names = frozenset(path.name for path in folder.iterdir())
    server = DashboardServer("127.0.0.1", 0, dict, lambda since: [], CollectorRegistry(), dataset=(folder, names))
    server.start()
    yield server.url + "data/", folder, digest
    server.stop()


def test_the_server_answers_range_requests_and_nothing_outside_the_dataset(served):
    url, folder, _ = served
    whole = (folder / "shard-00003.bin").read_bytes()
    request = urllib.request.Request(url + "shard-00003.bin", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == whole[10:20]
    with urllib.request.urlopen(url + "shard-00003.bin") as response:
        assert response.read() == whole
    for name in ("../prepared/manifest.json", "shard-00099.bin", "%2e%2e/x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + name)
        assert refused.value.code == 404, name


def test_a_peer_downloads_a_shard_once_and_gets_the_sequences_prepared(served, tmp_path):
    url, folder, digest = served
    dataset = RemoteDataset(url, digest, SEQ_LEN, tmp_path / "cache", cache_limit_bytes=1 << 20)
    manifest_entry = dataset.manifest.shards[2]
    rows = dataset.sequences_of(2)
    assert rows.equal(read_shard(folder / manifest_entry.file, manifest_entry))
    assert dataset.sequences_of(2).equal(rows) and dataset.downloads == 1  # the second read is from the cache


def test_a_download_cut_off_is_resumed_from_where_it_stopped(served, tmp_path):
    url, folder, digest = served
    dataset = RemoteDataset(url, digest, SEQ_LEN, tmp_path / "cache", cache_limit_bytes=1 << 20)
    entry = dataset.manifest.shards[1]
    whole = (folder / entry.file).read_bytes()
    # What a cut connection leaves; a wrong byte in it would fail the digest, a missing resume too.
    (dataset.folder / f".{entry.file}.part").write_bytes(whole[: len(whole) // 2])
    assert dataset.sequences_of(1).equal(read_shard(folder / entry.file))
    assert not (dataset.folder / f".{entry.file}.part").exists()


def test_a_corrupted_shard_on_the_server_is_refused_and_never_cached(served, tmp_path):
    url, folder, digest = served
    dataset = RemoteDataset(url, digest, SEQ_LEN, tmp_path / "cache", cache_limit_bytes=1 << 20)
    entry = dataset.manifest.shards[5]
    data = bytearray((folder / entry.file).read_bytes())
    data[-1] ^= 0xFF
    (folder / entry.file).write_bytes(bytes(data))

    with pytest.raises(DatasetError) as refused:
        dataset.sequences_of(5)
    message = str(refused.value)
    assert "\n" not in message and entry.file in message and url in message and "SHA-256" in message
    assert not (dataset.folder / entry.file).exists()
    assert dataset.sequences_of(4).shape == (16, SEQ_LEN)  # the other shards are fine


def test_a_manifest_that_is_not_the_runs_is_refused(served, tmp_path):
    url, _, digest = served
    other = "0" * 64
    with pytest.raises(DatasetError) as refused:
        RemoteDataset(url, other, SEQ_LEN, tmp_path / "cache", cache_limit_bytes=1 << 20)
    assert "manifest" in str(refused.value) and "SHA-256" in str(refused.value)


def test_the_cache_keeps_to_its_limit(served, tmp_path):
    url, _, digest = served
    shard_size = (served[1] / "shard-00000.bin").stat().st_size
    dataset = RemoteDataset(url, digest, SEQ_LEN, tmp_path / "cache", cache_limit_bytes=2 * shard_size)
    for shard in [0, 1, 2, 3, 4, 5, 6, 7, 0]:
        dataset.sequences_of(shard)
        # the limit is for the shards kept beyond the one in use
        assert dataset.cached_bytes() <= 2 * shard_size + shard_size
    assert dataset.downloads == 9  # shard 0 had been evicted: it came again


def test_a_peer_with_no_copy_of_the_data_trains_on_the_shards_it_downloads(
    tmp_path, write_run_config, coordinator, launch_peer
):
    folder = tmp_path / "prepared"
    digest = prepared_dataset(folder, shards=32)
    run_toml = write_run_config(tmp_path, target_batch_size=16)
    run_toml.write_text(run_toml.read_text().replace("[data]\n", f'[data]\npath = "{folder}"\ndataset = "{digest}"\n'))
    coord = coordinator(run_toml)
    cache = tmp_path / "peer-cache"
    epochs = 3
    peer = launch_peer("volunteer", initial_peers=[coord.address], max_epochs=epochs, data_cache=str(cache))
    summary = peer.wait(timeout=240)

    assert summary["epoch"] >= epochs and summary["samples_contributed"] > 0
    downloaded = sorted(path.name for path in (cache / digest).glob("shard-*.bin"))
    # one shard per epoch trained (and the next one prefetched): not the whole dataset
    assert 1 <= len(downloaded) <= summary["epoch"] + 2 < 32
    manifest = Manifest.from_json((folder / MANIFEST).read_text(), "manifest")
    entries = {entry.file: entry for entry in manifest.shards}
    for name in downloaded:
        read_shard(cache / digest / name, entries[name])  # each one checked against the manifest
    shown = coord.wait_for(lambda s: s["dataset"] is not None, 30, "the dataset on the dashboard")["dataset"]
    assert shown["sha256"] == digest and shown["shards"] == 32 and shown["sequences"] == 32 * 16


def test_a_coordinator_whose_folder_is_not_the_runs_dataset_refuses_to_start(tmp_path, write_run_config, capsys):
    folder = tmp_path / "prepared"
    prepared_dataset(folder)
    run_toml = write_run_config(tmp_path)
    data = f'[data]\npath = "{folder}"\ndataset = "{"1" * 64}"\n'
    run_toml.write_text(run_toml.read_text().replace("[data]\n", data))
    assert coordinator_main(["--config", str(run_toml), "--state-dir", str(tmp_path / "state")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("manifest.json: its SHA-256 is not the run's data.dataset"), line
