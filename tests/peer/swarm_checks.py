"""Peers that average every value of every round hold the same parameters, bit for bit.

Every member of a group ends an all-reduce round with the same values: reducers send each part's
decoded average itself, and every member takes it (peer.averager.SharedAverages). Peers that held
the same state and then averaged every value of every round therefore step on the same gradients
from the same optimizer state, and their parameters stay equal, bit for bit (the same operations
on the same values). A round a peer misses, in part or whole, instead gives it, on those values, a
step on its own gradient rather than the average: about lr x 0.1 apart.

parameter_gap measures a difference in steps of lr: for each tensor, the root mean square of the
difference over lr, and the largest of these.
"""

from pathlib import Path

import torch

from model.data import load_corpus
from peer.averager import RoundOutcome
from peer.identity import load_or_create_identity, peer_id_of
from peer.run_config import RunConfig
from peer.shards import CorpusShards, shard_for

# Key files of fixed peer identities (diloco0, diloco1 and solo .key): a peer's id picks the shard
# it reads each epoch (peer.shards), so peers given these read the same shards in every run.
IDENTITIES = Path(__file__).parent / "identities"


def parameter_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> float:
    """The largest root-mean-square difference of a tensor between two peers, in units of lr."""
    return max(float((a[name].double() - b[name].double()).pow(2).mean().sqrt()) / lr for name in a)


def assert_parameters_agree(params: list[dict[str, torch.Tensor]], run: RunConfig, context: object = "") -> None:
    """Every peer's parameters equal to the first's (`context`: for the failure message)."""
    gaps = [parameter_gap(params[0], other, run.training.lr) for other in params[1:]]
    assert max(gaps) == 0.0, f"parameter gaps {gaps} (in steps of lr); {context}"


def epochs_on_swarm(peer) -> set[int]:
    """The epochs a harness peer entered on the swarm's parameters, from its epoch events: every
    round of its step into the epoch averaged every value with its group, and none before had left
    it off the swarm's. Its snapshot of any other epoch may hold parameters of its own."""
    return {
        event["epoch"]
        for event in peer.events()
        if event["event"] == "epoch"
        and event["rounds"]
        and all(outcome == RoundOutcome.SUCCEEDED.value for outcome in event["rounds"])
        and not event["off_swarm"]
    }


def mode_settings(mode: str, samples_per_epoch: int) -> dict:
    """write_run_config's arguments for a run of `mode` whose epochs hold samples_per_epoch samples:
    the target batch in batch mode, the round in DiLoCo mode (inner steps of 8 samples)."""
    if mode == "diloco":
        return dict(diloco=dict(samples_per_round=samples_per_epoch, inner_batch_size=8))
    return dict(target_batch_size=samples_per_epoch)


def shard_of(identity: Path, epoch: int, run: RunConfig) -> int:
    """The shard that a peer with this key file reads at `epoch` of `run` (its bundled corpus, split
    as a peer splits it: into at most one shard per sequence)."""
    corpus = load_corpus(run.data.path, seq_len=run.data.seq_len, seed=run.training.seed)
    num_shards = CorpusShards(corpus, run.data.num_shards).num_shards
    return shard_for(peer_id_of(load_or_create_identity(identity).get_public_key()), epoch, num_shards)
