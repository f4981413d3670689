"""Which sequences a peer trains on: one shard per (peer, epoch), chosen by hashing both, read in an
order of the peer's own for that epoch."""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from model.data import PackedCorpus


def _draw(peer_id: str, epoch: int, purpose: str = "") -> int:
    """A 64-bit number that depends only on the peer id, the epoch and what it is drawn for."""
    digest = hashlib.sha256(f"{peer_id}/{epoch}{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_for(peer_id: str, epoch: int, num_shards: int) -> int:
    """A shard index that depends only on the peer id and the epoch. Peers land on one shard by
    collision: N peers cover about num_shards (1 - (1 - 1 / num_shards)^N) shards an epoch (64 peers
    on 64 shards: 41, and 40 of the 64 share theirs), which is why each reads its shard in its own order."""
    return _draw(peer_id, epoch) % num_shards


def reading_order(peer_id: str, epoch: int, rows: int) -> torch.Tensor:
    """The order in which a peer reads the `rows` sequences of its shard at `epoch`: a permutation of
    its own, so that two peers on one shard train on different sequences. Read in the shard's own
    order, they took the same micro-batches on the same parameters: the same gradient twice,
    counted as twice the samples (and robust aggregation, seeing two senders agree exactly, clipped
    a third honest one)."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(_draw(peer_id, epoch, "/order") >> 1))


class ShardSource(Protocol):
    """Where a peer's shards come from: a corpus in memory (CorpusShards) or a dataset it downloads
    (peer.dataset.RemoteDataset)."""

    @property
    def num_shards(self) -> int: ...

    @property
    def teacher_targets(self) -> dict | None:
        """The manifest's teacher targets when each row carries them after its tokens (model.prepared)."""

    def sequences_of(self, shard: int) -> torch.Tensor: ...

    def prefetch(self, shard: int) -> None: ...


class CorpusShards:
    """The shards of a corpus in memory: its seeded split into `num_shards` parts (at most one per sequence)."""

    def __init__(self, corpus: PackedCorpus, num_shards: int) -> None:
        self.corpus = corpus
        self.indices = corpus.shard_indices(min(num_shards, len(corpus)))

    @property
    def num_shards(self) -> int:
        return len(self.indices)

    @property
    def teacher_targets(self) -> dict | None:
        return self.corpus.teacher_targets

    def sequences_of(self, shard: int) -> torch.Tensor:
        return self.corpus.sequences[self.indices[shard]]

    def prefetch(self, shard: int) -> None:
        """Nothing to fetch: the corpus is in memory."""


class ShardReader:
    """Micro-batches from this peer's shard for the current epoch, in the peer's reading order,
    cycling inside the shard; the next epoch's shard is prefetched when an epoch begins."""

    def __init__(self, source: ShardSource, peer_id: str) -> None:
        self.source, self.peer_id = source, peer_id
        self.epoch, self.position, self.rows, self.order = None, 0, None, None

    def shard_of(self, epoch: int) -> int:
        return shard_for(self.peer_id, epoch, self.source.num_shards)

    def next_batch(self, epoch: int, batch_size: int) -> torch.Tensor:
        if epoch != self.epoch:
            self.rows = self.source.sequences_of(self.shard_of(epoch))
            self.order = reading_order(self.peer_id, epoch, len(self.rows))
            self.epoch, self.position = epoch, 0
            self.source.prefetch(self.shard_of(epoch + 1))
        take = self.order[torch.arange(self.position, self.position + batch_size) % len(self.rows)]
        self.position += batch_size
        return self.rows[take]

    def put_back(self, batch_size: int) -> None:
        """Make the last `batch_size` sequences read the next ones again (a micro-batch not trained)."""
        self.position = max(0, self.position - batch_size)
