"""Objectives: the flow loss at its known optimum on Gaussian data, DDPM targets, label dropout."""

from __future__ import annotations

import pytest
import torch

from megalm.diffusion.objectives import DDPM, FLOW_TIME_SCALE, Flow, drop_labels


def _optimal_velocity(x_t: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
    """E[ε - x0 | x_t] for x0 ~ N(0, s²), x_t = (1 - t) x0 + t ε (jointly Gaussian)."""
    var = (1 - t) ** 2 * s * s + t * t
    return (t - (1 - t) * s * s) / var * x_t


def test_flow_loss_reaches_the_analytic_minimum_only_at_the_optimum():
    s, n = 0.5, 400_000
    g = torch.Generator().manual_seed(0)
    x0 = s * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)

    def model(scale: float):
        def f(x_t, t_in, y):
            t = (t_in / FLOW_TIME_SCALE).view(-1, 1, 1, 1)
            return scale * _optimal_velocity(x_t, t, s)
        return f

    flow = Flow()
    best = flow.loss(model(1.0), x0, noise, u, None).item()
    # Minimum = E_t[Var(ε - x0 | x_t)] = E_t[(1 + s²) - (t - (1 - t) s²)² / ((1 - t)² s² + t²)].
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    var = (1 - t) ** 2 * s * s + t * t
    expect = torch.mean((1 + s * s) - (t - (1 - t) * s * s) ** 2 / var).item()
    assert best == pytest.approx(expect, rel=0.01)
    for wrong in (0.9, 1.1):
        assert flow.loss(model(wrong), x0, noise, u, None).item() > best + 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_targets_invert_to_x0_and_eps(prediction):
    obj = DDPM("cosine", 1000, prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.9999], dtype=torch.float64)
    x_t, t_in, target = obj.noisy(x0, noise, u)
    assert t_in.tolist() == [0, 100, 500, 900, 999]
    for i in range(5):  # a perfect prediction recovers both ends of the interpolation
        x0_hat, eps_hat = obj.to_x0_eps(target[i:i + 1], x_t[i:i + 1], obj.abar[int(t_in[i])].item())
        assert torch.allclose(x0_hat, x0[i:i + 1], atol=1e-6) and torch.allclose(eps_hat, noise[i:i + 1], atol=1e-9)


def test_label_dropout_replaces_exactly_the_dropped_labels_by_the_null_class():
    y = torch.tensor([0, 1, 2, 3])
    out = drop_labels(y, torch.tensor([True, False, True, False]), 10)
    assert out.tolist() == [10, 1, 10, 3]
