"""Diffusion Transformer (DiT, Peebles & Xie 2023), readable top to bottom.

    DiT(config)(x [B, C, H, W], t [B] (timestep units), y [B] (class, or num_classes = null))
        -> [B, C or 2C, H, W]: the prediction (noise, v or velocity; + variance logits with
           learn_sigma).

Patchify -> transformer blocks conditioned by adaLN-Zero (the fused `megalm.ops.adaln` op:
LayerNorm without affine, then `* (1 + scale) + shift`, and a zero-initialised gate on each
residual) -> final adaLN + linear -> unpatchify. The condition is a sinusoidal timestep embedding
plus a class embedding whose extra row (`num_classes`) is the null class used for
classifier-free guidance. Positions are fixed 2-D sin-cos tables (a buffer, not trained).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm import CONFIGS_DIR
from megalm.config import Invalid, Section, build, read_yaml, validate_tree
from megalm.errors import UserError
from megalm.ops import adaln_layer_norm

# Named shapes: package data beside the LM presets (megalm/configs/models/dit/presets.yaml).
PRESETS_FILE = CONFIGS_DIR / "models" / "dit" / "presets.yaml"


def dit_presets() -> dict[str, dict[str, Any]]:
    """Preset name (`DiT-XL/2`, `dit-tiny`, ...) -> DiTConfig fields."""
    return read_yaml(PRESETS_FILE, "DiT presets")


@dataclass
class DiTConfig(Section):
    image_size: int = 32  # square images (or latents) of image_size x image_size
    channels: int = 4
    patch_size: int = 2
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional
    learn_sigma: bool = False  # also predict the variance interpolation (improved DDPM)
    freq_dim: int = 256  # sinusoidal timestep features before the MLP
    # Frequencies 10000^(-k / (freq_dim/2 - freq_shift)). 1 is diffusers' DiTTransformer2DModel
    # (hard-coded there), so an export is exact; 0 is the DiT paper's code.
    freq_shift: int = 1

    @property
    def out_channels(self) -> int:
        return self.channels * (2 if self.learn_sigma else 1)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, values: dict[str, Any], source: str = "model_config") -> "DiTConfig":
        """A model_config recorded in a checkpoint; one saved before freq_shift existed used 0."""
        return cls.from_dict({"freq_shift": 0, **values}, source)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model") -> "DiTConfig":
        """Fields, or `preset` (a name in dit_presets()) plus overrides; errors name the key."""
        values = dict(values)
        preset = values.pop("preset", None)
        base: dict[str, Any] = {}
        if preset is not None:
            presets = dit_presets()
            if preset not in presets:
                raise UserError(f"{source}: preset: unknown DiT preset {preset!r}; expected one of "
                                f"{', '.join(presets)}")
            base = dict(presets[preset])
        return build(cls, {**base, **values}, source)

    def validate(self) -> None:
        for key in ("image_size", "channels", "patch_size", "dim", "depth", "heads", "freq_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise Invalid(key, f"expected a positive integer, got {getattr(self, key)!r}")
        if self.image_size % self.patch_size:
            raise Invalid("patch_size", f"{self.patch_size} does not divide image_size={self.image_size}")
        if self.dim % self.heads:
            raise Invalid("heads", f"{self.heads} does not divide dim={self.dim}")
        if self.num_classes < 0:
            raise Invalid("num_classes", f"expected >= 0, got {self.num_classes}")
        if self.freq_shift not in (0, 1) or self.freq_shift >= self.freq_dim // 2:
            raise Invalid("freq_shift", f"expected 0 or 1 (below freq_dim/2), got {self.freq_shift!r}")
        if self.mlp_ratio <= 0:
            raise Invalid("mlp_ratio", f"expected > 0, got {self.mlp_ratio}")


def timestep_features(t: torch.Tensor, dim: int, shift: int = 1, max_period: float = 10000.0) -> torch.Tensor:
    """[B] float timesteps -> [B, dim] cos/sin features at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    angles = t.float()[:, None] * freqs[None]
    feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(feats, (0, dim % 2))


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fixed positions: half the channels encode the row, half the column."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_axis(dim // 2, cols.reshape(-1)), one_axis(dim // 2, rows.reshape(-1))], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.dim
        hidden = int(d * config.mlp_ratio)
        self.attn = Attention(d, config.heads)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.modulation = nn.Linear(d, 6 * d)  # shift, scale, gate for attention and for the MLP

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(adaln_layer_norm(x, shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(adaln_layer_norm(x, shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.modulation = nn.Linear(config.dim, 2 * config.dim)
        self.linear = nn.Linear(config.dim, config.patch_size ** 2 * config.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(adaln_layer_norm(x, shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        validate_tree(config, "model config")
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.register_buffer("pos_embed", sincos_2d(c.dim, c.image_size // c.patch_size)[None], persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        # Row num_classes is the null class: the unconditional model used by guidance.
        self.class_embed = nn.Embedding(c.num_classes + 1, c.dim) if c.num_classes else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.final = FinalLayer(c)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so each block starts
        # as the identity and the untrained model predicts 0.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for m in (self.final.modulation, self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def null_class(self) -> int:
        return self.config.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        g, p = c.image_size // c.patch_size, c.patch_size
        x = x.view(x.shape[0], g, g, p, p, c.out_channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c.out_channels, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.patch_embed.weight.dtype  # the engine may have cast the module to bf16
        h = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2) + self.pos_embed.to(dtype)
        cond = self.time_mlp(timestep_features(t, self.config.freq_dim, self.config.freq_shift).to(dtype))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class(), dtype=torch.long, device=x.device)
            cond = cond + self.class_embed(y)
        for block in self.blocks:
            h = block(h, cond)
        return self.unpatchify(self.final(h, cond)).float()
