"""Noise schedules: ᾱ and SNR identities."""

from __future__ import annotations

import math

import pytest
import torch

from megalm.diffusion.schedules import alpha_bar, betas_linear, snr
from megalm.errors import UserError


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_is_a_decreasing_signal_fraction(kind):
    ab = alpha_bar(kind, 1000)
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    assert torch.all(ab > 0) and torch.all(ab < 1)
    assert torch.all(ab[1:] < ab[:-1])
    s = snr(ab)
    assert torch.all(s[1:] < s[:-1])
    # SNR and ᾱ carry the same information: ᾱ = SNR / (1 + SNR).
    assert torch.allclose(s / (1 + s), ab, rtol=1e-12, atol=0)


def test_linear_matches_ho_et_al():
    betas = betas_linear(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    ab = alpha_bar("linear", 1000)
    assert torch.allclose(ab, torch.cumprod(1 - betas, 0))
    assert ab[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # ~ no signal left at T
    # A shorter chain spans the same range: ᾱ at the end is as small.
    assert alpha_bar("linear", 100)[-1].item() < 1e-4


def test_cosine_follows_the_closed_form_until_clipping():
    T, s = 1000, 0.008
    ab = alpha_bar("cosine", T)
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 250, 500, 900):
        expect = math.cos(((t + 1) / T + s) / (1 + s) * math.pi / 2) ** 2 / f0
        assert ab[t].item() == pytest.approx(expect, rel=1e-9)
    # SNR = 1 (half signal) near the middle of the chain
    assert 400 < int(torch.argmin((snr(ab) - 1).abs())) < 600


def test_unknown_schedule_names_the_key():
    with pytest.raises(UserError, match="diffusion.schedule"):
        alpha_bar("quadratic", 10)
