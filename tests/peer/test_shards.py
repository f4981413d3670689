"""Each peer reads its own shard per epoch."""

import torch

from model.data import PackedCorpus
from peer.shards import CorpusShards, ShardReader, shard_for


def test_shard_depends_on_peer_and_epoch_only():
    assert shard_for("peer-a", 3, 64) == shard_for("peer-a", 3, 64)
    peers = [f"peer-{i}" for i in range(8)]
    assert len({shard_for(p, 0, 1024) for p in peers}) == 8  # no collision among a few peers
    assert len({shard_for("peer-a", epoch, 64) for epoch in range(20)}) > 10  # moves across epochs


def test_reader_cycles_inside_its_shard():
    corpus = PackedCorpus(torch.arange(100 * 3).view(100, 3))
    shards = CorpusShards(corpus, num_shards=10)
    reader = ShardReader(shards, "peer-a")
    shard_rows = set(shards.sequences_of(reader.shard_of(0))[:, 0].tolist())
    first = torch.cat([reader.next_batch(0, 4) for _ in range(5)])
    assert set(first[:, 0].tolist()) == shard_rows  # 20 rows drawn cover the 10-row shard twice
    assert torch.equal(first[:10], first[10:])
    other_epoch = reader.next_batch(7, 4)
    assert not set(other_epoch[:, 0].tolist()) <= shard_rows or reader.shard_of(7) == reader.shard_of(0)


def test_two_peers_on_one_shard_read_it_in_orders_of_their_own():
    """Peers whose ids land on the same shard (a collision: 40 of 64 peers on 64 shards share theirs)
    each read the whole shard once per cycle, but never the same micro-batch: in the shard's own
    order they trained on the same sequences, the same gradient twice."""
    corpus = PackedCorpus(torch.arange(1000 * 3).view(1000, 3))
    shards = CorpusShards(corpus, num_shards=10)
    first = ShardReader(shards, "peer-0")
    second = next(
        ShardReader(shards, f"peer-{i}") for i in range(1, 100) if shard_for(f"peer-{i}", 0, 10) == first.shard_of(0)
    )
    shard_rows = sorted(shards.sequences_of(first.shard_of(0))[:, 0].tolist())
    batches = [[set(reader.next_batch(0, 4)[:, 0].tolist()) for _ in range(25)] for reader in (first, second)]
    for reader_batches in batches:
        assert sorted(row for batch in reader_batches for row in batch) == shard_rows  # a cycle: every row once
    assert not any(a == b for a, b in zip(*batches))
