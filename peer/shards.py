"""Which sequences a peer trains on: one shard per (peer, epoch), chosen by hashing both."""

from __future__ import annotations

import hashlib

import torch

from model.data import PackedCorpus


def shard_for(peer_id: str, epoch: int, num_shards: int) -> int:
    """A shard index that depends only on the peer id and the epoch. Different peers land on
    different shards except by rare collision (about peers / num_shards)."""
    digest = hashlib.sha256(f"{peer_id}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_shards


class ShardReader:
    """Micro-batches from this peer's shard for the current epoch, cycling inside the shard."""

    def __init__(self, corpus: PackedCorpus, peer_id: str, num_shards: int) -> None:
        self.corpus, self.peer_id = corpus, peer_id
        self.shard_indices = corpus.shard_indices(min(num_shards, len(corpus)))
        self.epoch, self.position = None, 0

    def shard_of(self, epoch: int) -> int:
        return shard_for(self.peer_id, epoch, len(self.shard_indices))

    def next_batch(self, epoch: int, batch_size: int) -> torch.Tensor:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        rows = self.shard_indices[self.shard_of(epoch)]
        take = torch.arange(self.position, self.position + batch_size) % len(rows)
        self.position += batch_size
        return self.corpus.sequences[rows[take]]

    def put_back(self, batch_size: int) -> None:
        """Make the last `batch_size` sequences read the next ones again (a micro-batch not trained)."""
        self.position = max(0, self.position - batch_size)
