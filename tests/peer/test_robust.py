"""Robust aggregation: CenteredClip keeps honest peers' average when a minority sends garbage."""

import torch

from coordinator.harness import LOOPBACK_MADDR
from peer.averager import RUNNERS
from peer.robust import CLIP_FACTOR, centered_clip
from peer.run_config import AGGREGATIONS


def honest_parts(count: int, values: int = 10_000, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Gradients of peers on the same model: a shared direction plus each peer's own noise."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(values, generator=generator)
    return shared + noise * torch.randn(count, values, generator=generator)


def weighted_mean(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights[:, None] * parts).sum(0) / weights.sum()


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_aggregation_has_a_runner():
    assert set(RUNNERS) == set(AGGREGATIONS)


def test_honest_peers_get_their_exact_weighted_mean():
    parts, weights = honest_parts(5), torch.tensor([4.0, 8.0, 12.0, 1.0, 30.0])
    torch.testing.assert_close(centered_clip(parts, weights), weighted_mean(parts, weights), atol=1e-5, rtol=1e-5)


def test_a_scaled_or_non_finite_minority_moves_the_result_by_at_most_its_clipped_share():
    honest, weights = honest_parts(4), torch.tensor([8.0, 8.0, 8.0, 8.0, 8.0])
    expected = weighted_mean(honest, weights[:4])
    # At the fixed point the honest pull balances the attacker's clipped pull: the result is at most
    # its weight over the honest weight (1/4) times the radius away from the honest mean; the radius
    # is CLIP_FACTOR median distances from an honest medoid, at most the largest honest pairwise distance.
    radius = CLIP_FACTOR * torch.cdist(honest, honest).max()
    bound = 1.01 * radius / 4
    for attack in [
        1e6 * honest[0],
        -1e6 * honest[0],
        torch.full_like(honest[0], float("nan")),
        torch.full_like(honest[0], float("inf")),
        1e30 * torch.ones_like(honest[0]),
    ]:
        result = centered_clip(torch.cat([honest, attack[None]]), weights)
        assert result.isfinite().all()
        assert (result - expected).norm() <= bound, f"moved by {(result - expected).norm():.3f}, bound {bound:.3f}"
        assert relative_distance(result, expected) < 0.15
    plain = weighted_mean(torch.cat([honest, 1e6 * honest[:1]]), weights)
    assert relative_distance(plain, expected) > 1e4  # what the plain mean does with the same attack


def test_two_attackers_among_seven():
    parts = torch.cat([honest_parts(5, seed=1), 1e6 * torch.randn(2, 10_000)])
    weights = torch.ones(7)
    assert relative_distance(centered_clip(parts, weights), weighted_mean(parts[:5], weights[:5])) < 0.2


def test_small_groups_and_nothing_finite():
    parts, weights = honest_parts(2), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(centered_clip(parts, weights), weighted_mean(parts, weights))
    with_nan = torch.cat([parts, torch.full((1, parts.shape[1]), float("nan"))])
    torch.testing.assert_close(centered_clip(with_nan, torch.tensor([1.0, 3.0, 5.0])), weighted_mean(parts, weights))
    assert centered_clip(torch.full((3, 4), float("nan")), torch.ones(3)).isnan().all()
    zero_weight = torch.cat([parts, 1e6 * parts[:1]])
    torch.testing.assert_close(centered_clip(zero_weight, torch.tensor([1.0, 3.0, 0.0])), weighted_mean(parts, weights))


def test_all_reduce_keeps_honest_average_when_one_peer_sends_scaled_or_non_finite_gradients(bootstrap):
    """Three real hivemind averagers (processes with their own libp2p daemons), one of them broken."""
    import hivemind

    from peer.averager import CountingGradientAverager
    from peer.compression import gradient_compression
    from peer.run_config import AveragingSection

    shapes = [(300, 1000), (1000,)]
    honest = [
        [
            honest_parts(2, values=int(torch.tensor(shape).prod()), seed=s)[i].view(shape)
            for s, shape in enumerate(shapes)
        ]
        for i in range(2)
    ]
    expected = [(a + b) / 2 for a, b in zip(*honest)]
    compression = gradient_compression(AveragingSection())
    # A scaled sender moves each part by at most its weight share (1/3) times the clip radius (3
    # median distances, about the honest peers' spread of 0.1): measured 0.16. A non-finite one
    # is left out, and the two honest parts average exactly, up to the 8-bit codec's error.
    for attack, bound in [(lambda g: g * 1e6, 0.25), (lambda g: torch.full_like(g, float("nan")), 0.03)]:
        gradients = honest + [[attack(g) for g in honest[0]]]
        dhts = [hivemind.DHT(initial_peers=[bootstrap], host_maddrs=[LOOPBACK_MADDR], start=True) for _ in range(3)]
        averagers, params = [], []
        for dht, grads in zip(dhts, gradients):
            peer_params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
            for param, grad in zip(peer_params, grads):
                param.grad = grad.clone()
            averager = CountingGradientAverager(
                peer_params,
                dht=dht,
                prefix="robust_test",
                target_group_size=3,
                min_group_size=3,
                min_matchmaking_time=3.0,
                compression=compression,
                start=True,
            )
            averager.accumulate_grads_(batch_size=8)
            averagers.append(averager)
            params.append(peer_params)
        try:
            controls = [averager.step(wait=False, timeout=60) for averager in averagers]
            for control in controls:
                control.result(timeout=90)
            for averager in averagers[:2]:
                with averager.get_tensors() as averaged:
                    for result, target in zip(averaged, expected):
                        assert result.isfinite().all()
                        assert relative_distance(result, target) < bound, relative_distance(result, target)
        finally:
            for averager in averagers:
                averager.shutdown()
            for dht in dhts:
                dht.shutdown()
