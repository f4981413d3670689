"""Which sequences a peer trains on: one shard per (peer, epoch), chosen by hashing both."""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from model.data import PackedCorpus


def shard_for(peer_id: str, epoch: int, num_shards: int) -> int:
    """A shard index that depends only on the peer id and the epoch. Different peers land on
    different shards except by rare collision (about peers / num_shards)."""
    digest = hashlib.sha256(f"{peer_id}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_shards


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
    """Micro-batches from this peer's shard for the current epoch, cycling inside the shard; the
    next epoch's shard is prefetched when an epoch begins."""

    def __init__(self, source: ShardSource, peer_id: str) -> None:
        self.source, self.peer_id = source, peer_id
        self.epoch, self.position, self.rows = None, 0, None

    def shard_of(self, epoch: int) -> int:
        return shard_for(self.peer_id, epoch, self.source.num_shards)

    def next_batch(self, epoch: int, batch_size: int) -> torch.Tensor:
        if epoch != self.epoch:
            self.rows = self.source.sequences_of(self.shard_of(epoch))
            self.epoch, self.position = epoch, 0
            self.source.prefetch(self.shard_of(epoch + 1))
        take = torch.arange(self.position, self.position + batch_size) % len(self.rows)
        self.position += batch_size
        return self.rows[take]

    def put_back(self, batch_size: int) -> None:
        """Make the last `batch_size` sequences read the next ones again (a micro-batch not trained)."""
        self.position = max(0, self.position - batch_size)
