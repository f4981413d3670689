"""Two peers reach the loss that one process reaches on the same samples: in batch mode on the same
global batch, in DiLoCo mode with several inner steps a round."""

import torch
from swarm_checks import IDENTITIES

from model import CausalLM
from model.data import load_corpus
from peer.run_config import AveragingSection, RunConfig

EPOCHS = 10
# nats on a held-out batch. The final loss of one process varies by 0.03 (standard deviation, 4 runs:
# each run's peer id picks other shards of the corpus), the difference of two runs by about 0.045,
# and the swarm ends 0.05 below one process on average: 0.1 lies 3 deviations above that.
TOLERANCE = 0.1
DILOCO_ROUNDS = 12
DILOCO_SAMPLES = 1536  # 12 rounds of 128: about 8 inner steps of 8 samples per peer and round
INNER_BATCH = 8
SOLO_BATCH = 2 * INNER_BATCH  # the two peers' inner batches together
TRAIN_SEQUENCES = 2048  # the corpus's first plays
HELD_OUT = 64  # sequences of its last play
# Held-out loss of DiLoCo above one process's, relative. With the peers' fixed identities below,
# one process ended at the same loss in 6 runs, DiLoCo 1.2-2.0% above it (mean 1.45%, standard
# deviation 0.33): 3% lies 4.7 deviations above the mean.
# With each run's own identities (other shards each run), the difference spread over -2.0% to
# +3.3% in 12 runs: the bound would not hold. With the default momentum (Nesterov 0.9) DiLoCo ended
# 5.0-9.1% above in 5 runs of those: the bound tells the two apart.
DILOCO_TOLERANCE = 0.03


def held_out_loss(run: RunConfig, params: dict, batch: torch.Tensor | None = None) -> float:
    model = CausalLM(run.model_config()).eval()
    model.load_state_dict(params, strict=False)
    if batch is None:
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


def test_two_diloco_peers_reach_the_held_out_loss_of_one_process_on_the_same_samples(
    tmp_path, write_run_config, start_peer, release_peers, write_prepared_text
):
    """Two DiLoCo peers train 12 rounds on the corpus's first plays, one process as many samples in
    batch mode, its batch the two peers' inner batches together. Both are measured on the corpus's
    last play, which neither trained on. The outer step takes no momentum, the setting for runs of
    few rounds (peer.run_config.DilocoSection). The swarm's rounds hold a few more samples than
    their target (5% here: peers learn late that a round is complete)."""
    train = tmp_path / "text"
    write_prepared_text(train, TRAIN_SEQUENCES, text=True)
    settings = dict(lr=3e-3, average_state_every=AveragingSection.average_state_every)
    (tmp_path / "solo").mkdir()
    (tmp_path / "diloco").mkdir()
    solo_toml = write_run_config(tmp_path / "solo", run_id="diloco-solo", target_batch_size=SOLO_BATCH, **settings)
    diloco = dict(samples_per_round=DILOCO_SAMPLES // DILOCO_ROUNDS, inner_batch_size=INNER_BATCH, outer_momentum=0.0)
    diloco_toml = write_run_config(tmp_path / "diloco", run_id="diloco-swarm", diloco=diloco, **settings)
    solo = start_peer(
        "solo-peer",
        solo_toml,
        max_epochs=DILOCO_SAMPLES // SOLO_BATCH,
        batch_size=8,
        data=str(train),
        identity=str(IDENTITIES / "solo.key"),
    )
    swarm = [
        start_peer(
            f"diloco-peer{i}",
            diloco_toml,
            max_epochs=DILOCO_ROUNDS,
            hold=True,
            data=str(train),
            identity=str(IDENTITIES / f"diloco{i}.key"),
        )
        for i in range(2)
    ]
    release_peers(swarm)
    # one process, alone, takes each epoch on its whole batch (peer.progress.RunProgressTracker)
    assert solo.wait(timeout=400)["samples_contributed"] == DILOCO_SAMPLES
    summaries = [peer.wait(timeout=400) for peer in swarm]
    assert all(s["rounds_succeeded"] == DILOCO_ROUNDS and s["inner_steps"] >= 2 * DILOCO_ROUNDS for s in summaries)

    run = RunConfig.load(solo_toml)
    held_out = load_corpus(seq_len=run.data.seq_len).sequences[-HELD_OUT:]  # the last play, never trained on
    torch.manual_seed(run.training.seed)
    initial = held_out_loss(run, dict(CausalLM(run.model_config()).named_parameters()), held_out)
    solo_loss = held_out_loss(run, solo.params(), held_out)
    diloco_losses = [held_out_loss(run, peer.params(), held_out) for peer in swarm]
    assert diloco_losses[0] == diloco_losses[1], "the peers ended apart"
    assert solo_loss < initial - 1.0, "the single process did not learn"
    # One-sided, as above: the swarm's rounds lose nothing that one process keeps.
    assert diloco_losses[0] < solo_loss * (1 + DILOCO_TOLERANCE), f"DiLoCo {diloco_losses} vs one process {solo_loss}"
