"""How far apart peers' parameters may be when they average every value of every round.

Each gradient round gives every peer the group's average, but each receives it through the 8-bit
codec (the reducer sends each peer the difference between the average and the peer's own part,
quantised in 256-value blocks): peers step on averages that differ by the codec's error, about 1%
of the gradient's norm (tests/peer/test_averaging.py measures 0.7-1.1%, and allows 2%). AdamW
takes a tenth of a step's gradient into its momentum (beta1 0.9) and moves each value by at most
about lr, so one round moves peers apart by about lr x 0.1 x 1%; until state averaging pulls them
together (every average_state_every epochs) these differences add up. A round a peer misses, in
part or whole, instead gives it, on those values, a step on its own gradient rather than the
average, which differs from it by the order of the gradient itself: about lr x 0.1 apart.

parameter_gap measures the difference in those units: for each tensor, the root mean square of the
difference over lr, and the largest of these.
"""

import torch

from peer.run_config import RunConfig

# In steps of lr: how far one round through the 8-bit codec moves two peers apart, at most.
# Measured up to 0.016 per round with the shipped settings (tests/peer/test_agreement.py, 3 runs with
# AdamW's moments averaged with the parameters; before they were, up to 0.02), 0.002-0.005
# with the small test runs' (lr 1e-3, 32 tokens), where a peer that missed a third of one round's
# values was 6-7 times as far from the others as they were from each other.
CODEC_DRIFT_PER_ROUND = 0.025


def parameter_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> float:
    """The largest root-mean-square difference of a tensor between two peers, in units of lr."""
    return max(float((a[name].double() - b[name].double()).pow(2).mean().sqrt()) / lr for name in a)


def parameters_agree_bound(rounds: int) -> float:
    """The largest parameter_gap of peers that started from the same parameters and then
    averaged every value of `rounds` rounds."""
    return CODEC_DRIFT_PER_ROUND * rounds


def assert_parameters_agree(
    params: list[dict[str, torch.Tensor]], run: RunConfig, rounds: int, context: object = ""
) -> None:
    """Every peer within parameters_agree_bound(rounds) of the first (`context`: for the failure message)."""
    gaps = [parameter_gap(params[0], other, run.training.lr) for other in params[1:]]
    assert max(gaps) <= parameters_agree_bound(rounds), (
        f"parameter gaps {gaps} (in steps of lr) after {rounds} rounds; {context}"
    )


def mode_settings(mode: str, samples_per_epoch: int) -> dict:
    """write_run_config's arguments for a run of `mode` whose epochs hold samples_per_epoch samples:
    the target batch in batch mode, the round in DiLoCo mode (inner steps of 8 samples)."""
    if mode == "diloco":
        return dict(diloco=dict(samples_per_round=samples_per_epoch, inner_batch_size=8))
    return dict(target_batch_size=samples_per_epoch)
