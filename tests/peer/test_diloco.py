"""DiLoCo mode with real peer processes: the outer round's arithmetic, error feedback, equivalence
with batch mode, and peers of different speeds."""

import json

import pytest
import torch
from hivemind.compression import NoCompression
from safetensors.torch import load_file
from swarm_checks import IDENTITIES, shard_of

from model import CausalLM, parameter_groups
from model.data import load_corpus
from peer.codec import Blockwise4Bit
from peer.compression import pseudo_gradient_compression
from peer.diloco import ErrorFeedback
from peer.faults import FaultPlan
from peer.optimizer import lr_multiplier
from peer.run_config import RunConfig, RunConfigError, TrainingSection
from peer.shards import CorpusShards, ShardReader

# Relative L2 error of the 8-bit codec on a tensor (peer.codec: about 0.007 on normal data; the
# bound leaves room for blocks less regular than normal data).
CODEC_RELATIVE_ERROR = 0.015


def initial_parameters(run: RunConfig) -> dict[str, torch.Tensor]:
    """The parameters every peer of the run starts from (the run's seed)."""
    torch.manual_seed(run.training.seed)
    return {name: p.detach().clone() for name, p in CausalLM(run.model_config()).named_parameters()}


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[name].reshape(-1).double() for name in sorted(params)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_an_outer_round_steps_every_peer_on_the_weighted_average_pseudo_gradient(
    tmp_path, write_run_config, start_peer, release_peers
):
    """Three peers, one slowed down by 0.2 s a micro-batch, released together: in the first round each takes its
    own inner steps (the fast ones more), then every peer's parameters are the round-start ones
    minus the Nesterov outer step on the sample-weighted average of the three pseudo-gradients,
    within the codec's error; no part of the round is missing."""
    run_toml = write_run_config(tmp_path, average_state_every=5, diloco=dict(samples_per_round=360, inner_batch_size=8))
    run = RunConfig.load(run_toml)
    # Fixed identities, so that the three read three different shards: two peers on one shard (by a
    # collision of their ids' hashes, 1 run in about 21) send almost the same pseudo-gradient, and
    # CenteredClip, the shipped aggregation, then clips the third as an outlier (a run here: the
    # fast pair 1.4 apart, the slow peer 37 from them, 6.5% off the weighted mean).
    slow_down = {"fast-a": 0.0, "fast-b": 0.0, "slow": 0.2}
    identities = dict(zip(slow_down, (IDENTITIES / f"{key}.key" for key in ("diloco0", "diloco1", "solo"))))
    assert len({shard_of(identity, 0, run) for identity in identities.values()}) == 3
    peers = [
        start_peer(
            name,
            run_toml,
            max_epochs=1,
            hold=True,
            snapshots=True,
            faults=FaultPlan(slow_forward=slow),
            identity=str(identities[name]),
        )
        for name, slow in slow_down.items()
    ]
    release_peers(peers)
    summaries = [peer.wait(timeout=240) for peer in peers]
    for peer in peers:
        epoch_events = peer.events("epoch")
        assert epoch_events[0]["epoch"] == 1 and epoch_events[0]["rounds"] == ["succeeded"], epoch_events
    rounds = [json.loads((peer.folder / "round-0.json").read_text()) for peer in peers]
    weights = [r["samples"] for r in rounds]
    # The fast peers took more inner steps and weigh more.
    assert min(rounds[0]["inner_steps"], rounds[1]["inner_steps"]) > rounds[2]["inner_steps"] >= 1
    assert min(weights[:2]) > weights[2]
    assert [s["samples_contributed"] for s in summaries] == weights  # one round: the weight is every sample

    start = initial_parameters(run)
    pseudo_gradients = [
        {name: start[name] - local[name] for name in start} for local in (load_round(peer) for peer in peers)
    ]
    step = run.diloco.outer_lr * (1 + run.diloco.outer_momentum)  # Nesterov's first step: (1 + momentum) x lr
    true_mean = sum(w * flat(pg) for w, pg in zip(weights, pseudo_gradients)) / sum(weights)
    plain_mean = sum(flat(pg) for pg in pseudo_gradients) / len(pseudo_gradients)
    without_slow = sum(w * flat(pg) for w, pg in zip(weights[:2], pseudo_gradients[:2])) / sum(weights[:2])
    for peer in peers:
        # The codec's error on the way to the reducers and back (a peer's own share comes back exact) ...
        assert relative(flat(start) - flat(peer.snapshot(1)), step * true_mean) < 2 * CODEC_RELATIVE_ERROR
    # ... is a bound that a mean without the weights, or without the slow peer, would not meet even
    # with the codec's error in its favour. The slow peer's weight, and with it the second margin,
    # shrinks as a loaded machine slows the fast peers: at 0.3 s a micro-batch it took 5 of the
    # round's 52 inner steps here (margin 0.08-0.09), and the margin came out 0.060 in a suite; at 0.2 s,
    # 6-7 of 52 and 0.10-0.11.
    assert relative(step * plain_mean, step * true_mean) > 3 * CODEC_RELATIVE_ERROR
    assert relative(step * without_slow, step * true_mean) > 3 * CODEC_RELATIVE_ERROR

    # What the peers sent: each, the parts of its pseudo-gradient that the others reduce, and the
    # averages of the part it reduces back to both; all of it plus its own part, whose size is
    # hivemind's partition's choice. Together: four times the pseudo-gradient, in 8 bits and a
    # float32 scale per 256 values (tensors under the codec's threshold in 16 bits), plus framing.
    small = sum(t.numel() for t in start.values() if t.numel() < run.averaging.compression_threshold)
    large = sum(t.numel() for t in start.values()) - small
    encoded = large * (1 + 4 / 256) + 2 * small
    sent = [summary["bytes_sent"] for summary in summaries]
    assert all(part >= encoded for part in sent) and 4 * encoded <= sum(sent) <= 1.01 * 4 * encoded, (sent, encoded)


def load_round(peer) -> dict[str, torch.Tensor]:
    """The peer's local parameters at the end of its first round's inner steps."""
    return load_file(peer.folder / "round-0.safetensors")


def test_error_feedback_sends_every_pseudo_gradient_in_the_end():
    """With the 4-bit codec, what was sent over several rounds plus the residual is the sum of the
    true pseudo-gradients, and what encode_() leaves is exactly what the all-reduce sends."""
    torch.manual_seed(0)
    codec = pseudo_gradient_compression(
        RunConfig.from_dict({"training": {"mode": "diloco"}, "diloco": {"compression": "blockwise-4bit"}}).diloco,
        RunConfig().averaging,
    )
    feedback = ErrorFeedback(codec)
    shapes = [(300, 257), (1000,), (70000,)]  # a tensor above the 4-bit threshold, one below, one of odd shape
    true_sum = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    sent_sum = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    for _ in range(6):
        pseudo_gradients = [torch.randn(shape) * 1e-3 for shape in shapes]
        buffers = [pg.clone() for pg in pseudo_gradients]
        feedback.encode_(buffers)
        for index, buffer in enumerate(buffers):
            assert torch.equal(feedback.round_trip(buffer, index), buffer)  # sent as it is
        feedback.encode_(buffers := [pg.clone() for pg in pseudo_gradients])  # a round loaded twice: same result
        feedback.commit()
        for total, pg in zip(true_sum, pseudo_gradients):
            total += pg.double()
        for total, buffer in zip(sent_sum, buffers):
            total += buffer.double()
    for true, sent, residual in zip(true_sum, sent_sum, feedback.residuals):
        assert (sent + residual.double() - true).abs().max() < 1e-9
        assert residual.abs().max() > 0  # the codec is lossy: there was something to feed back
    assert isinstance(codec.greater_equal, Blockwise4Bit) and not isinstance(codec, NoCompression)


def test_the_schedule_between_epochs_rises_to_the_base_rate_and_never_above_it():
    """DiLoCo's inner steps take the schedule at fractional epochs (the round's share done)."""
    multiplier = lr_multiplier(TrainingSection(warmup_epochs=4, total_epochs=20))
    values = [multiplier(tenth / 10) for tenth in range(200)]
    peak = values.index(max(values))
    assert values[0] == 0.25 and max(values) == 1.0 and peak == 30  # 1/4 at the start, full from epoch 3
    assert values[:peak] == sorted(values[:peak]) and values[peak:] == sorted(values[peak:], reverse=True)
    assert multiplier(20) == pytest.approx(0.1)


def sgd_reference(run: RunConfig, rounds: list[dict], micro_batch: int, peer_id: str) -> dict[str, torch.Tensor]:
    """Plain SGD over the batches the lone DiLoCo peer `peer_id` trained on: in each round, one step
    per inner_batch_size samples (micro-batch gradients averaged) and one on the round's remainder."""
    torch.manual_seed(run.training.seed)
    model = CausalLM(run.model_config())
    corpus = load_corpus(run.data.path, seq_len=run.data.seq_len, seed=run.training.seed)
    reader = ShardReader(CorpusShards(corpus, run.data.num_shards), peer_id)  # one shard, in the peer's order
    optimizer = torch.optim.SGD(parameter_groups(model.parameters(), run.training.weight_decay), lr=run.training.lr)
    multiplier = lr_multiplier(run.training)
    for epoch, round_ in enumerate(rounds):
        left = round_["samples"]
        while left > 0:
            micro_batches = min(run.diloco.inner_batch_size, left) // micro_batch
            for _ in range(micro_batches):
                batch = reader.next_batch(epoch, micro_batch)
                model(batch, labels=batch).loss.backward()
            for p in model.parameters():
                p.grad /= micro_batches
            for group in optimizer.param_groups:
                group["lr"] = run.training.lr * multiplier(epoch)
            optimizer.step()
            optimizer.zero_grad()
            left -= micro_batches * micro_batch
    return {name: p.detach() for name, p in model.named_parameters()}


def test_with_plain_sgd_inside_and_an_outer_lr_of_1_a_round_is_batch_sgd(tmp_path, write_run_config, launch_peer):
    """A lone DiLoCo peer with plain SGD as the inner optimizer and an outer SGD of lr 1 without
    momentum takes exactly the SGD steps of its inner batches: one step per round of
    inner_batch_size samples is batch mode's step. (hivemind ends an epoch at the estimated time
    its target is reached, so a round may hold a second, partial inner batch; the reference takes
    the same steps.) The inner learning rate follows the schedule by the swarm's progress within
    the round: it differs from the reference's by the cosine's change over a fraction of an epoch,
    under 1e-5 relative at these epochs."""
    run_toml = write_run_config(
        tmp_path,
        optimizer="sgd",
        lr=0.05,
        max_grad_norm=1e6,
        num_shards=1,
        diloco=dict(samples_per_round=16, inner_batch_size=16, outer_lr=1.0, outer_momentum=0.0, compression="none"),
    )
    run = RunConfig.load(run_toml)
    peer = launch_peer("lone", config=str(run_toml), max_epochs=4, snapshots=True)
    summary = peer.wait(timeout=180)
    rounds = [json.loads((peer.folder / f"round-{epoch}.json").read_text()) for epoch in range(4)]
    assert summary["inner_steps"] == rounds[-1]["inner_steps"] >= 4
    start = flat(initial_parameters(run))
    reference = flat(sgd_reference(run, rounds, micro_batch=4, peer_id=peer.events("joined")[0]["peer_id"]))
    assert relative(flat(peer.params()) - start, reference - start) < 1e-4


@pytest.mark.parametrize(
    "diloco, culprit",
    [
        ({"outer_lr": 2.5}, "diloco.outer_lr"),
        ({"outer_lr": 0.0}, "diloco.outer_lr"),
        ({"outer_momentum": 1.0}, "diloco.outer_momentum"),
        ({"compression": "int3"}, "diloco.compression"),
        ({"samples_per_round": 4, "inner_batch_size": 8}, "diloco.samples_per_round"),
        ({"inner_batch_size": 0}, "diloco.inner_batch_size"),
    ],
)
def test_inconsistent_round_settings_are_refused_by_name(diloco, culprit):
    with pytest.raises(RunConfigError, match=culprit):
        RunConfig.from_dict({"training": {"mode": "diloco"}, "diloco": diloco})


def test_diloco_keys_in_a_batch_run_are_refused():
    with pytest.raises(RunConfigError, match=r"\[diloco\] is only for training.mode"):
        RunConfig.from_dict({"diloco": {"outer_lr": 0.5}})


def test_the_mode_and_round_settings_are_part_of_the_training_key():
    batch = RunConfig()
    diloco = RunConfig.from_dict({"training": {"mode": "diloco"}})
    other_rounds = RunConfig.from_dict({"training": {"mode": "diloco"}, "diloco": {"samples_per_round": 2048}})
    assert len({batch.training_key(), diloco.training_key(), other_rounds.training_key()}) == 3
