"""Corpus loading, packing and sharding."""

import logging

import numpy as np
import pytest
import torch

from model.data import PackedCorpus, bundled_corpus_files, load_corpus, pack


def test_bundled_corpus_is_the_gutenberg_plays():
    files = bundled_corpus_files()
    assert len(files) == 42
    corpus = load_corpus(seq_len=256)
    assert 1.6e6 < len(corpus) * 256 <= 1.7e6
    assert corpus.sequences.max() < 32000 and corpus.sequences.min() >= 0


def test_pack_drops_only_the_incomplete_tail():
    packed = pack(np.arange(23), 5)
    assert packed.shape == (4, 5)
    assert torch.equal(packed.flatten(), torch.arange(20))


def test_shards_are_disjoint_complete_and_deterministic():
    corpus = PackedCorpus(torch.arange(103 * 4).view(103, 4), seed=7)
    shards = corpus.shard_indices(5)
    together = torch.cat(shards)
    assert sorted(together.tolist()) == list(range(103))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    again = PackedCorpus(corpus.sequences.clone(), seed=7).shard_indices(5)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other_seed = PackedCorpus(corpus.sequences, seed=8).shard_indices(5)
    assert not torch.equal(shards[0], other_seed[0])
    assert torch.equal(corpus.shard(2, 5), corpus.sequences[shards[2]])


def test_user_folder_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Whether 'tis nobler in the mind to suffer. " * 40)
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(tmp_path, seq_len=32)
    assert len(corpus) > 10


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: p, "holds no"),
    ],
)
def test_missing_or_empty_corpus_gives_a_clear_error(tmp_path, make, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        load_corpus(make(tmp_path))


def test_too_short_corpus_gives_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("Brevity.")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_corpus(tmp_path / "short.txt", seq_len=128)


def test_bad_shard_arguments():
    corpus = PackedCorpus(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_shards"):
        corpus.shard_indices(5)
    with pytest.raises(ValueError, match="shard index"):
        corpus.shard(4, 4)


class RecordedLogs(logging.Handler):
    """The records one logger emits, whatever the logging set-up of earlier tests left behind."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    "trouble, message", [("full", "No space left on device"), ("read-only", "Read-only file system")]
)
def test_a_cache_that_cannot_be_written_costs_nothing_but_a_warning(
    tmp_path, small_filesystem, monkeypatch, trouble, message
):
    corpus_folder = tmp_path / "corpus"
    corpus_folder.mkdir()
    (corpus_folder / "play.txt").write_text("Now is the winter of our discontent, made glorious summer. " * 400)
    monkeypatch.setenv("STARLING_CACHE", str(tmp_path / "writable-cache"))
    expected = load_corpus(corpus_folder, seq_len=32)

    filesystem = small_filesystem(16)  # smaller than the cached tokens
    if trouble == "read-only":
        filesystem.remount_read_only()
    monkeypatch.setenv("STARLING_CACHE", str(filesystem.path / "cache"))
    records = RecordedLogs()
    logger = logging.getLogger("starling.model")
    logger.addHandler(records)
    try:
        corpus = load_corpus(corpus_folder, seq_len=32)
    finally:
        logger.removeHandler(records)
    assert torch.equal(corpus.sequences, expected.sequences)
    warnings = [record.getMessage() for record in records.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and message in warnings[0] and str(filesystem.path / "cache") in warnings[0]
    assert not list(filesystem.path.rglob("*.tmp")), "a partial cache file was left behind"
