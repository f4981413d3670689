"""Two peers reach the loss that one process reaches on the same global batch."""

import torch

from model import CausalLM
from model.data import load_corpus
from peer.run_config import AveragingSection, RunConfig

EPOCHS = 10
# nats on a held-out batch. The final loss of one process varies by 0.03 (standard deviation, 4 runs:
# each run's peer id picks other shards of the corpus), the difference of two runs by about 0.045,
# and the swarm ends 0.05 below one process on average: 0.1 lies 3 deviations above that.
TOLERANCE = 0.1


def held_out_loss(run: RunConfig, params: dict) -> float:
    model = CausalLM(run.model_config()).eval()
    model.load_state_dict(params, strict=False)
    batch = load_corpus(seq_len=run.data.seq_len, seed=123).sequences[-64:]
    with torch.no_grad():
        return model(batch, labels=batch).loss.item()


def test_two_peers_match_one_process_on_the_same_global_batch(tmp_path, write_run_config, start_peer, release_peers):
    # State averaged as shipped (every 5th epoch), not every epoch as in the other swarm tests: this
    # test is about the gradient rounds. With 2.5 s epochs and a state round every epoch, hivemind's
    # per-peer decision whether an epoch has one (skipped while the last is still in progress, or
    # while it counts no other peer) once left one peer in a state round alone for the averaging
    # timeout, and the pair a step behind one process (issue 15, open).
    settings = dict(target_batch_size=32, lr=3e-3, average_state_every=AveragingSection.average_state_every)
    (tmp_path / "solo").mkdir()
    (tmp_path / "swarm").mkdir()
    solo_toml = write_run_config(tmp_path / "solo", run_id="equivalence-solo", **settings)
    swarm_toml = write_run_config(tmp_path / "swarm", run_id="equivalence-swarm", **settings)
    solo = start_peer("solo-peer", solo_toml, max_epochs=EPOCHS, batch_size=8)
    swarm = [start_peer(f"swarm-peer{i}", swarm_toml, max_epochs=EPOCHS, batch_size=4, hold=True) for i in range(2)]
    release_peers(swarm)
    solo.wait(timeout=400)
    summaries = [peer.wait(timeout=400) for peer in swarm]
    assert all(s["rounds_succeeded"] >= EPOCHS // 2 for s in summaries)

    run = RunConfig.load(solo_toml)
    torch.manual_seed(run.training.seed)
    initial = held_out_loss(run, dict(CausalLM(run.model_config()).named_parameters()))
    solo_loss = held_out_loss(run, solo.params())
    swarm_loss = held_out_loss(run, swarm[0].params())
    assert solo_loss < initial - 1.0, "the single process did not learn"
    # One-sided: an epoch of the swarm averages at least the target batch (hivemind's peers overshoot
    # it by the samples accumulated while the others learn that it is reached) from two shards, and
    # ended below one process in 4 of 5 runs. Learning less than one process by more than the
    # run-to-run spread means its rounds lost part of the batch.
    assert swarm_loss < solo_loss + TOLERANCE, f"swarm {swarm_loss:.3f} vs one process {solo_loss:.3f}"
