"""LoRA, applied from outside to a plain model: `apply_lora(model, cfg)` swaps each targeted
`nn.Linear` for a `LoraLinear` (the frozen original as `.base`, plus `lora_A` [r, in] and
`lora_B` [out, r]) and freezes everything else, so only the adapters train.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

B starts at zero, so step 0 computes exactly the base model. `merge_lora_items` turns a LoRA
model's state-dict items into the plain model's names with W + (alpha / rank) * B @ A, which is
what export and `megalm sample` need (the adapters alone, for serving stacks that load adapters on
top of a base model, are written into each checkpoint by megalm.train.sft.adapter_files).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import Invalid, Section
from megalm.errors import UserError

# The Linear layers of megalm.models.llm: attention (wq, wk, wv, wo) and MLP (w1, w2, w3).
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig(Section):
    """The `lora:` section of a run config; rank 0 = off (full finetuning)."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    dropout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise Invalid("rank", f"expected an integer >= 0 (0 = off), got {self.rank!r}")
        if not self.alpha > 0:
            raise Invalid("alpha", f"expected a number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise Invalid("dropout", f"expected 0 <= dropout < 1, got {self.dropout!r}")
        if not self.targets:
            raise Invalid("targets", f"expected at least one of {', '.join(TARGETS)}")
        for i, t in enumerate(self.targets):
            if t not in TARGETS:
                raise Invalid(f"targets[{i}]", f"{t!r} is not a layer name; expected any of {', '.join(TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as LoRA's paper uses
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every Linear named in cfg.targets; freeze all other parameters. In place; returns model."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = dict.fromkeys(cfg.targets, 0)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in found and isinstance(child, nn.Linear):
                setattr(module, name, LoraLinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                found[name] += 1
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        raise UserError(f"lora.targets: {', '.join(missing)} match no layer of this model (an MLP other than "
                        f"swiglu has no w3)")
    return model


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def merge_lora_items(items: Iterable[tuple[str, torch.Tensor]], lora: LoraConfig
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA model's state-dict items -> the plain model's names and merged weights.

    `X.base.weight` + `X.lora_A` + `X.lora_B` become `X.weight` = W + (alpha/rank) B @ A (in at
    least fp32, cast back to W's dtype); `X.base.bias` becomes `X.bias`; other items pass through. In
    state-dict order a module's three tensors are adjacent (lora_A, lora_B, base.weight), so at most
    one module is buffered; in another order a tensor waits only until its module is complete.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in items:
        for part in ("base.weight", "lora_A", "lora_B"):
            if name.endswith("." + part):
                prefix = name[: -len(part) - 1]
                parts = pending.setdefault(prefix, {})
                parts[part] = tensor
                if len(parts) == 3:
                    del pending[prefix]
                    w = parts["base.weight"]
                    dt = torch.promote_types(w.dtype, torch.float32)  # bf16 weights merge in fp32
                    delta = parts["lora_B"].to(dt) @ parts["lora_A"].to(dt)
                    yield f"{prefix}.weight", (w.to(dt) + lora.scale * delta).to(w.dtype)
                break
        else:
            yield (name.replace(".base.bias", ".bias") if name.endswith(".base.bias") else name), tensor
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise UserError(f"LoRA weights of {prefix}: found only {', '.join(sorted(parts))}; expected base.weight, "
                        f"lora_A and lora_B")


def plain_items(items: Iterable[tuple[str, torch.Tensor]], run_data: dict[str, Any]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's state-dict items as the plain model's: merged with merge_lora_items when the
    run's saved data (client state `data`) records a LoRA run, unchanged otherwise."""
    lora = run_data.get("lora")
    if lora and lora.get("rank"):
        return merge_lora_items(items, LoraConfig(**lora))
    return iter(items)
