"""Training objectives: what the network sees (x_t, its timestep input) and what it must predict.

Every random quantity (noise ε, the uniform draw `u` that picks the time, the label-dropout draw)
comes in with the batch, drawn per sample from a generator seeded by (seed, global sample index),
so a loss is a pure function of the batch and the weights.
"""

from __future__ import annotations

import abc

import torch

from megalm.diffusion.config import DiffusionSection
from megalm.diffusion.schedules import alpha_bar
from megalm.errors import UserError

FLOW_TIME_SCALE = 1000.0  # flow time t in [0, 1] enters the timestep embedding as t * 1000


class Objective(abc.ABC):
    @abc.abstractmethod
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, timestep input for the model, regression target)."""

    def loss(self, model, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x_t, t_in, target = self.noisy(x0, noise, u)
        pred = model(x_t, t_in, y)[:, : x0.shape[1]]
        return torch.mean((pred.float() - target.float()) ** 2)


class DDPM(Objective):
    def __init__(self, schedule: str = "cosine", timesteps: int = 1000, prediction: str = "eps"):
        self.T, self.prediction = timesteps, prediction
        self.abar = alpha_bar(schedule, timesteps)

    def index(self, u: torch.Tensor) -> torch.Tensor:
        return torch.clamp((u.double() * self.T).long(), max=self.T - 1)

    def noisy(self, x0, noise, u):
        t = self.index(u)
        ab = self.abar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x_t = a * x0 + s * noise
        target = noise if self.prediction == "eps" else a * noise - s * x0
        return x_t, t.to(x0.dtype), target

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, ab: float) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = ab ** 0.5, (1 - ab) ** 0.5
        if self.prediction == "eps":
            return (x_t - s * pred) / a, pred
        return a * x_t - s * pred, s * x_t + a * pred


class Flow(Objective):
    """Rectified flow: x_t = (1 - t) x0 + t ε, the network predicts the velocity ε - x0."""

    def noisy(self, x0, noise, u):
        t = u.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise, u.to(x0.dtype) * FLOW_TIME_SCALE, noise - x0


def build_objective(cfg: DiffusionSection, learn_sigma: bool = False) -> Objective:
    if learn_sigma:
        # Training the variance needs the variational bound term; only the forward pass exists.
        raise UserError("model.learn_sigma: training a learned variance is not supported yet; set it to false")
    if cfg.objective == "flow":
        return Flow()
    return DDPM(cfg.schedule, cfg.timesteps, cfg.prediction)


def drop_labels(y: torch.Tensor, drop: torch.Tensor, null_class: int) -> torch.Tensor:
    """Classifier-free guidance training: labels where `drop` is set become the null class."""
    return torch.where(drop.bool(), torch.full_like(y, null_class), y)
