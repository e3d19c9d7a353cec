"""DDPM noise schedules: ᾱ_t (cumulative signal fraction) for t = 0..T-1, as float64.

x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε; SNR(t) = ᾱ_t / (1 - ᾱ_t).
"""

from __future__ import annotations

import math

import torch

from megalm.errors import UserError

SCHEDULES = ("linear", "cosine")


def betas_linear(steps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear β, rescaled so any T spans the same noise range as T = 1000."""
    scale = 1000 / steps
    return torch.linspace(start * scale, end * scale, steps, dtype=torch.float64)


def alpha_bar_cosine(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine ᾱ, with β clipped at max_beta so the last step stays finite."""
    f = [math.cos((i / steps + s) / (1 + s) * math.pi / 2) ** 2 for i in range(steps + 1)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], max_beta) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def alpha_bar(kind: str, steps: int) -> torch.Tensor:
    if kind == "linear":
        return torch.cumprod(1 - betas_linear(steps), dim=0)
    if kind == "cosine":
        return alpha_bar_cosine(steps)
    raise UserError(f"diffusion.schedule: expected one of {', '.join(SCHEDULES)}, got {kind!r}")


def snr(abar: torch.Tensor) -> torch.Tensor:
    return abar / (1 - abar)
