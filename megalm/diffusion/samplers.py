"""Samplers with classifier-free guidance: DDPM ancestral and DDIM (for the DDPM objective),
Euler and Heun (for flow matching). All take a generator, so a sample is reproducible.

Guidance mixes the conditional and the null-class prediction: u + w (c - u); w = 1 is the plain
conditional model (one forward), w = 0 the unconditional one.
"""

from __future__ import annotations

from typing import Callable

import torch

from megalm.diffusion.objectives import DDPM, FLOW_TIME_SCALE, Flow, Objective
from megalm.errors import UserError

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def guided(model: Model, x: torch.Tensor, t_in: float, y: torch.Tensor | None, scale: float,
           null_class: int) -> torch.Tensor:
    C = x.shape[1]
    t = torch.full((x.shape[0],), float(t_in), dtype=torch.float32, device=x.device)
    if y is None or scale == 1.0:
        return model(x, t, y)[:, :C].float()
    null = torch.full_like(y, null_class)
    if scale == 0.0:
        return model(x, t, null)[:, :C].float()
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[:, :C].float()
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def _ddpm_loop(obj: DDPM, model: Model, x: torch.Tensor, y, scale: float, null_class: int, steps: int,
               eta: float | None, gen: torch.Generator, clip: bool) -> torch.Tensor:
    """eta None: ancestral DDPM over the respaced schedule; else DDIM with that eta."""
    ts = torch.linspace(obj.T - 1, 0, steps).round().long().unique_consecutive().tolist()
    abar = obj.abar.tolist()
    for i, t in enumerate(ts):
        ab = abar[t]
        ab_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0, eps = obj.to_x0_eps(guided(model, x, t, y, scale, null_class), x, ab)
        if clip:  # keep x0 in the data range, then the noise estimate that agrees with it
            x0 = x0.clamp(-1, 1)
            eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        beta = 1 - ab / ab_prev  # the respaced step's β
        if eta is None:
            mean = (ab_prev ** 0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
            var = beta * (1 - ab_prev) / (1 - ab)
            x = mean + var ** 0.5 * z
        else:
            sigma = eta * ((1 - ab_prev) / (1 - ab) * beta) ** 0.5
            x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps + sigma * z
    return x


def _flow_loop(model: Model, x: torch.Tensor, y, scale: float, null_class: int, steps: int,
               heun: bool) -> torch.Tensor:
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        d = guided(model, x, t * FLOW_TIME_SCALE, y, scale, null_class)
        x_next = x + dt * d
        if heun and t_next > 0:
            d2 = guided(model, x_next, t_next * FLOW_TIME_SCALE, y, scale, null_class)
            x_next = x + dt * (d + d2) / 2
        x = x_next
    return x


@torch.no_grad()
def sample(objective: Objective, model: Model, shape: tuple[int, ...], y: torch.Tensor | None, *,
           sampler: str, steps: int, guidance: float = 1.0, null_class: int = 0, eta: float = 0.0,
           generator: torch.Generator | None = None, clip: bool = True) -> torch.Tensor:
    """Images in about [-1, 1], shape `shape`, for labels `y` (None: unconditional)."""
    if steps < 1:
        raise UserError(f"--steps: expected >= 1, got {steps}")
    if guidance < 0:
        raise UserError(f"--guidance: expected >= 0, got {guidance}")
    gen = generator or torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if isinstance(objective, Flow):
        if sampler not in ("euler", "heun"):
            raise UserError(f"--sampler: {sampler!r} does not fit a flow-matching model; expected euler or heun")
        x = _flow_loop(model, x, y, guidance, null_class, steps, heun=sampler == "heun")
        return x.clamp(-1, 1) if clip else x
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"--sampler: {sampler!r} does not fit a DDPM model; expected ddpm or ddim")
    if steps > objective.T:
        raise UserError(f"--steps: {steps} exceeds the model's {objective.T} timesteps")
    return _ddpm_loop(objective, model, x, y, guidance, null_class, steps, None if sampler == "ddpm" else eta,
                      gen, clip)
