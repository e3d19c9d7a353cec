"""Samplers: DDIM(η=1) is DDPM, flow samplers reach the data distribution, guidance arithmetic."""

from __future__ import annotations

import pytest
import torch

from megalm.diffusion.objectives import DDPM, FLOW_TIME_SCALE, Flow
from megalm.diffusion.samplers import guided, sample
from megalm.errors import UserError

S = 0.5  # data: x0 ~ N(0, S²) per pixel


def _gaussian_eps_model(obj: DDPM):
    """The exact ε-predictor for x0 ~ N(0, S²): E[ε | x_t] = sqrt(1-ᾱ) x_t / (ᾱ S² + 1 - ᾱ)."""
    def f(x, t_in, y):
        ab = obj.abar[t_in.long()].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * S * S + 1 - ab)
    return f


def _gaussian_velocity_model(x, t_in, y):
    t = (t_in / FLOW_TIME_SCALE).to(x.dtype).view(-1, 1, 1, 1)
    return (t - (1 - t) * S * S) / ((1 - t) ** 2 * S * S + t * t) * x


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_eta_1_equals_ddpm_ancestral(steps):
    obj = DDPM("linear", 1000, "eps")
    model = _gaussian_eps_model(obj)
    kw = dict(steps=steps, clip=False)
    a = sample(obj, model, (64, 1, 2, 2), None, sampler="ddpm", generator=torch.Generator().manual_seed(3), **kw)
    b = sample(obj, model, (64, 1, 2, 2), None, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.allclose(a, b, atol=1e-4)
    c = sample(obj, model, (64, 1, 2, 2), None, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(3), **kw)
    assert not torch.allclose(a, c, atol=1e-2)  # η = 0 is the deterministic sampler, not DDPM


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 50)])
def test_ddpm_samplers_reach_the_data_distribution(sampler, steps):
    obj = DDPM("cosine", 1000, "eps")
    x = sample(obj, _gaussian_eps_model(obj), (20000, 1, 1, 1), None, sampler=sampler, steps=steps, clip=False,
               generator=torch.Generator().manual_seed(0))
    assert x.std().item() == pytest.approx(S, rel=0.05)


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 20, 0.01), ("euler", 200, 0.02)])
def test_flow_samplers_reach_the_data_distribution(sampler, steps, tol):
    x = sample(Flow(), _gaussian_velocity_model, (20000, 1, 1, 1), None, sampler=sampler, steps=steps, clip=False,
               generator=torch.Generator().manual_seed(0))
    # The ODE maps N(0, 1) to N(0, S²) exactly; what is left is the discretisation error + sampling noise.
    assert x.std().item() == pytest.approx(S, rel=tol + 0.02)


def test_guidance_mixes_conditional_and_null_predictions():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()  # predicts its class index

    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    out = guided(model, x, 5.0, y, 4.0, null_class=10)
    assert torch.allclose(out[:, 0, 0, 0], 10 + 4.0 * (y - 10).float())  # u + w (c - u)
    assert calls == [6]  # one batched pass for both
    assert torch.equal(guided(model, x, 5.0, y, 1.0, 10)[:, 0, 0, 0], y.float()) and calls[-1] == 3
    assert torch.equal(guided(model, x, 5.0, y, 0.0, 10)[:, 0, 0, 0], torch.full((3,), 10.0))


def test_sampler_must_fit_the_objective():
    with pytest.raises(UserError, match="--sampler"):
        sample(Flow(), _gaussian_velocity_model, (1, 1, 1, 1), None, sampler="ddim", steps=2)
    with pytest.raises(UserError, match="--steps"):
        sample(DDPM("linear", 10), lambda x, t, y: x, (1, 1, 1, 1), None, sampler="ddim", steps=11)
