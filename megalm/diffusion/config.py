"""The `diffusion:` section of a training config (used when `task: diffusion`)."""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import Invalid, Section
from megalm.diffusion.schedules import SCHEDULES

OBJECTIVES = ("flow", "ddpm")
PREDICTIONS = ("eps", "v")
SAMPLERS = {"flow": ("heun", "euler"), "ddpm": ("ddim", "ddpm")}


@dataclass
class DiffusionSection(Section):
    objective: str = "flow"  # flow: rectified flow (velocity); ddpm: denoising diffusion
    prediction: str = "eps"  # ddpm only: eps | v
    schedule: str = "cosine"  # ddpm only: linear | cosine
    timesteps: int = 1000  # ddpm only: T
    class_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    ema_decay: float = 0.999  # per applied step, warmed up as min(decay, (1 + n) / (10 + n))
    grid_interval: int = 0  # steps between TensorBoard sample grids (EMA weights); 0 = off
    grid_steps: int = 25  # sampler steps for those grids
    grid_guidance: float = 2.0

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise Invalid("objective", f"expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.prediction not in PREDICTIONS:
            raise Invalid("prediction", f"expected one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")

        if self.schedule not in SCHEDULES:
            raise Invalid("schedule", f"expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.timesteps < 2:
            raise Invalid("timesteps", f"expected >= 2, got {self.timesteps}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise Invalid("class_dropout", f"expected 0 <= p < 1, got {self.class_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise Invalid("ema_decay", f"expected 0 <= decay < 1, got {self.ema_decay}")
        if self.grid_interval < 0 or self.grid_steps < 1:
            raise Invalid("grid_interval", "expected grid_interval >= 0 and grid_steps >= 1")
