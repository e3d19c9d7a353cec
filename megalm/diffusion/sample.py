"""`megalm sample CHECKPOINT --class 3 --guidance 4 --steps 50 --out grid.png` for DiT checkpoints.

The weights are the checkpoint's EMA (saved whole in the client state), so no DeepSpeed engine
or ZeRO consolidation is needed; the model shape, objective and class names come from what the
trainer recorded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megalm.cliparse import Parser
from megalm.diffusion.config import DiffusionSection
from megalm.diffusion.ema import load_flat
from megalm.diffusion.images import grid, write_png
from megalm.diffusion.objectives import Flow, Objective, build_objective
from megalm.diffusion.samplers import sample
from megalm.engine.layout import read_client_state
from megalm.errors import UserError
from megalm.models.dit import DiT, DiTConfig


def is_diffusion(meta: dict[str, Any]) -> bool:
    return meta.get("config", {}).get("task") == "diffusion"


def default_sampler(objective: Objective) -> str:
    return "heun" if isinstance(objective, Flow) else "ddim"


@torch.no_grad()
def generate(model: torch.nn.Module, objective: Objective, classes: list[int] | int, per_class: int, *,
             steps: int, guidance: float, sampler: str | None = None, seed: int = 0, eta: float = 0.0) -> torch.Tensor:
    """[len(classes) · per_class, C, H, W] in [-1, 1]: `per_class` images of each class in turn."""
    mc = model.config
    labels = list(range(classes)) if isinstance(classes, int) else list(classes)
    y = torch.tensor([c for c in labels for _ in range(per_class)], dtype=torch.long) if mc.num_classes else None
    n = len(labels) * per_class
    return sample(objective, model, (n, mc.channels, mc.image_size, mc.image_size), y,
                  sampler=sampler or default_sampler(objective), steps=steps, guidance=guidance,
                  null_class=mc.num_classes, eta=eta, generator=torch.Generator().manual_seed(seed))


def load(meta: dict[str, Any], source: str) -> tuple[torch.nn.Module, Objective]:
    """The EMA DiT (fp32, eval mode) and its objective from a checkpoint's client state."""
    mc = DiTConfig.from_saved(dict(meta["data"]["model_config"]), source=f"{source}: model_config")
    model = DiT(mc)
    try:
        flat = meta["task_state"]["ema"]["flat"]
    except KeyError:
        raise UserError(f"{source}: the checkpoint holds no EMA weights (task_state.ema)") from None
    load_flat(model, flat.float())
    return model.eval(), build_objective(DiffusionSection(**meta["config"]["diffusion"]), mc.learn_sigma)


def from_checkpoint(checkpoint: str) -> tuple[torch.nn.Module, Objective]:
    """The EMA DiT and its objective from any path megalm.checkpoint.reader.resolve takes."""
    tag_dir, meta = read_client_state(checkpoint)
    if not is_diffusion(meta):
        raise UserError(f"{tag_dir}: not a diffusion checkpoint (task: {meta.get('config', {}).get('task')!r})")
    return load(meta, tag_dir)


def parser() -> Parser:
    p = Parser(prog="megalm sample", description="Sample an image grid from a DiT checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("--class", dest="classes", type=int, action="append",
                   help="class index (repeatable); default: one row per class")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None, help="flow: heun | euler; ddpm: ddim | ddpm (default heun / ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (1 ~ DDPM)")
    p.add_argument("-n", "--per-class", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=0, help="pixel enlargement in the PNG (default: to ~64 px)")
    p.add_argument("--out", default="grid.png")
    return p


def main(argv: list[str], meta: dict[str, Any], source: str) -> int:
    args = parser().parse_args(argv)
    model, objective = load(meta, source)
    mc = model.config
    classes = args.classes if args.classes else list(range(max(mc.num_classes, 1)))
    for c in classes:
        if not 0 <= c < max(mc.num_classes, 1):
            raise UserError(f"--class: {c} is not one of the model's classes 0..{mc.num_classes - 1}")
    if args.per_class < 1:
        raise UserError(f"--per-class: expected >= 1, got {args.per_class}")
    images = generate(model, objective, classes, args.per_class, steps=args.steps, guidance=args.guidance,
                      sampler=args.sampler, seed=args.seed, eta=args.eta)
    scale = args.scale or max(1, 64 // mc.image_size)
    out = os.path.abspath(args.out)
    write_png(out, grid(images, rows=len(classes), scale=scale))
    print(f"{out}: {len(classes)} x {args.per_class} samples, guidance {args.guidance}, {args.steps} steps")
    return 0
