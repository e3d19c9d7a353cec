"""A DiT checkpoint -> a diffusers folder (`megalm export CKPT --format diffusers --out DIR`):

    DIR/transformer/config.json + diffusion_pytorch_model.safetensors   DiTTransformer2DModel, fp32
    DIR/scheduler/scheduler_config.json                                 the training noise schedule
    DIR/README.md                                                       model card

The weights are the EMA (what `megalm sample` uses) when the checkpoint holds it, else the
trained weights. The folder appears whole or not at all (megalm/export/outdir.py).

Mapping, megalm DiT -> DiTTransformer2DModel; the forward passes agree to float rounding:
- patch_embed -> pos_embed.proj. Neither saves the sin-cos position table: both rebuild it from
  the shape with the same formula (first half of the channels the column, second the row).
- time_mlp.0 / .2 and class_embed -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1
  / linear_2 and .class_embedder.embedding_table, copied into every block i: diffusers gives each
  block its own condition embedding (the final layer reads block 0's), megalm shares one.
  The class table's last row is the null class in both (diffusers' LabelEmbedding adds it when
  its dropout is > 0, which DiTTransformer2DModel fixes at 0.1). An unconditional megalm DiT has
  no class table: it becomes one zero row, so diffusers must be given class_labels = 0.
- blocks.{i}.modulation -> norm1.linear (same shift/scale/gate order); attn.qkv, fused q|k|v
  rows -> attn1.to_q / to_k / to_v; attn.proj -> attn1.to_out.0; mlp.0 / .2 -> ff.net.0.proj /
  ff.net.2; final.modulation -> proj_out_1; final.linear -> proj_out_2.
- Timestep features: DiTTransformer2DModel hard-codes 256 of them at frequencies
  10000^(-k/127) (downscale_freq_shift=1); the DiT paper's code divides by 128 instead. Distinct
  frequencies are linearly independent functions of t, so no weights can turn one into the other:
  megalm's `model.freq_shift` (1 by default) picks diffusers' form, and a model trained with 0 is
  refused here rather than exported approximately.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import torch

from megalm.diffusion.config import DiffusionSection
from megalm.diffusion.objectives import FLOW_TIME_SCALE
from megalm.diffusion.schedules import betas_linear
from megalm.engine import layout
from megalm.errors import UserError
from megalm.export.outdir import check_destination, staged_dir
from megalm.export.shards import write_safetensors
from megalm.models.dit import DiT, DiTConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_FREQ_DIM = 256  # CombinedTimestepLabelEmbeddings' fixed Timesteps(num_channels=256)
DIFFUSERS_FF_MULT = 4  # BasicTransformerBlock's FeedForward width when no ff_inner_dim is passed
MIN_DIFFUSERS = "0.30.0"  # recorded as _diffusers_version when diffusers is not installed here


def check_exportable(c: DiTConfig, source: str) -> None:
    """Refuse, naming the key, a DiT shape DiTTransformer2DModel cannot express exactly."""
    def refuse(key: str, what: str) -> UserError:
        return UserError(f"{source}: model.{key}: {what}; diffusers' DiTTransformer2DModel cannot represent it")

    if c.freq_shift != 1:
        raise refuse("freq_shift", f"is {c.freq_shift} (timestep frequencies 10000^(-k/{c.freq_dim // 2})), "
                     f"diffusers divides by {DIFFUSERS_FREQ_DIM // 2 - 1}; train with model.freq_shift: 1")
    if c.freq_dim != DIFFUSERS_FREQ_DIM:
        raise refuse("freq_dim", f"is {c.freq_dim}, diffusers fixes {DIFFUSERS_FREQ_DIM}")
    if int(c.dim * c.mlp_ratio) != DIFFUSERS_FF_MULT * c.dim:
        raise refuse("mlp_ratio", f"is {c.mlp_ratio}, diffusers' MLP is {DIFFUSERS_FF_MULT}x wide")
    if c.dim % 4:
        raise refuse("dim", f"is {c.dim}, diffusers' 2-D sin-cos positions need a multiple of 4")


def transformer_config(c: DiTConfig) -> dict[str, Any]:
    try:
        # optional (the export extra): only its version string is recorded
        import diffusers

        version = diffusers.__version__
    except ImportError:  # the export itself needs only safetensors
        version = MIN_DIFFUSERS
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": version,
            "num_attention_heads": c.heads, "attention_head_dim": c.dim // c.heads,
            "in_channels": c.channels, "out_channels": c.out_channels, "num_layers": c.depth,
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": c.image_size,
            "patch_size": c.patch_size, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": c.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": 1e-6}  # megalm's adaLN LayerNorms use 1e-6


def diffusers_items(state: dict[str, torch.Tensor], c: DiTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers name, tensor) for a megalm DiT state dict (names as in DiT.named_parameters())."""
    yield "pos_embed.proj.weight", state["patch_embed.weight"]
    yield "pos_embed.proj.bias", state["patch_embed.bias"]
    classes = state["class_embed.weight"] if c.num_classes else torch.zeros(1, c.dim)
    for i in range(c.depth):
        emb, src, dst = f"transformer_blocks.{i}.norm1.emb.", f"blocks.{i}.", f"transformer_blocks.{i}."
        for j, k in ((0, 1), (2, 2)):
            for part in ("weight", "bias"):
                yield f"{emb}timestep_embedder.linear_{k}.{part}", state[f"time_mlp.{j}.{part}"]
        yield f"{emb}class_embedder.embedding_table.weight", classes
        for part in ("weight", "bias"):
            yield f"{dst}norm1.linear.{part}", state[f"{src}modulation.{part}"]
            q, k, v = state[f"{src}attn.qkv.{part}"].chunk(3, dim=0)
            yield f"{dst}attn1.to_q.{part}", q
            yield f"{dst}attn1.to_k.{part}", k
            yield f"{dst}attn1.to_v.{part}", v
            yield f"{dst}attn1.to_out.0.{part}", state[f"{src}attn.proj.{part}"]
            yield f"{dst}ff.net.0.proj.{part}", state[f"{src}mlp.0.{part}"]
            yield f"{dst}ff.net.2.{part}", state[f"{src}mlp.2.{part}"]
    for part in ("weight", "bias"):
        yield f"proj_out_1.{part}", state[f"final.modulation.{part}"]
        yield f"proj_out_2.{part}", state[f"final.linear.{part}"]


def transformer_items(state: dict[str, torch.Tensor], c: DiTConfig) -> list[tuple[str, torch.Tensor]]:
    """transformer/<weights>'s tensors, fp32. Views of `state`, not copies: write_safetensors
    writes each tensor's bytes on its own, so views sharing storage (the EMA vector, the condition
    embedding written once per block) need no private copy."""
    return [(name, t.detach().float().contiguous()) for name, t in diffusers_items(state, c)]


def scheduler_config(diffusion: dict[str, Any]) -> dict[str, Any]:
    """The diffusers scheduler that trains with megalm's schedule and targets."""
    d = DiffusionSection(**diffusion)
    if d.objective == "flow":
        # x_t = (1 - s) x0 + s noise, velocity noise - x0, timestep s * 1000: diffusers' convention too.
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": int(FLOW_TIME_SCALE),
                "shift": 1.0, "use_dynamic_shifting": False}
    cfg: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": d.timesteps,
                           "prediction_type": "epsilon" if d.prediction == "eps" else "v_prediction",
                           "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                           "thresholding": False, "timestep_spacing": "linspace", "steps_offset": 0}
    if d.schedule == "linear":
        betas = betas_linear(d.timesteps)
        cfg.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]))
    else:  # Nichol & Dhariwal's cosine, beta capped at 0.999 (megalm's alpha_bar_cosine defaults)
        cfg.update(beta_schedule="squaredcos_cap_v2")
    return cfg


def ema_state(meta: dict[str, Any], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor] | None:
    """The EMA weights by parameter name (views into the saved flat vector), or None without one."""
    ema = meta.get("task_state", {}).get("ema")
    if ema is None:
        return None
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if [(n, tuple(s)) for n, s in ema["names"]] != shapes:
        raise UserError(f"{source}: task_state.ema lists other parameters than the recorded model_config's DiT")
    flat, out, offset = ema["flat"], {}, 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel())
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise UserError(f"{source}: task_state.ema.flat holds {flat.numel()} values, the DiT has {offset}")
    return out


def write_folder(out: str, state: dict[str, torch.Tensor], c: DiTConfig, files: dict[str, str]) -> None:
    """transformer/ (config + weights of `state`) and the text `files` (relative path -> text)
    under `out`, which appears whole or not at all (megalm/export/outdir.py)."""
    try:
        with staged_dir(out) as work:
            os.makedirs(os.path.join(work, "transformer"))
            write_safetensors(os.path.join(work, "transformer", WEIGHTS), transformer_items(state, c))
            texts = {"transformer/config.json": json.dumps(transformer_config(c), indent=2) + "\n", **files}
            for rel, text in texts.items():
                path = os.path.join(work, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the export ({exc.strerror or exc}); nothing was left there") from None


def export_dit(checkpoint: str, out_dir: str) -> None:
    """Write the diffusers folder for a DiT checkpoint (any path megalm.checkpoint.reader.resolve
    takes: a step folder, a checkpoint root, a run directory)."""
    out = check_destination(out_dir, overwrite=False)  # before the weights are read
    source, meta = layout.read_client_state(checkpoint)
    task = meta.get("config", {}).get("task")
    if task != "diffusion":
        raise UserError(f"{source}: not a DiT checkpoint (task {task!r}); --format diffusers exports "
                        f"`task: diffusion` runs, a language model exports with --format hf or gguf")
    config = DiTConfig.from_saved(dict(meta["data"]["model_config"]), source=f"{source}: model_config")
    check_exportable(config, source)
    with torch.device("meta"):  # names and shapes only
        model = DiT(config)
    state = ema_state(meta, model, source)
    use_ema = state is not None
    if state is None:
        state = layout.weights(source, meta, model)
    names = [n for n, _ in model.named_parameters()]
    if sorted(state) != sorted(names):
        raise UserError(f"{source}: weights do not fit the recorded DiT (missing "
                        f"{sorted(set(names) - set(state))[:3]}, unexpected {sorted(set(state) - set(names))[:3]})")
    sched = scheduler_config(meta["config"]["diffusion"])
    write_folder(out, state, config, {"scheduler/scheduler_config.json": json.dumps(sched, indent=2) + "\n",
                                      "README.md": model_card(meta, config, sched, source, use_ema)})


def model_card(meta: dict[str, Any], c: DiTConfig, sched: dict[str, Any], source: str, use_ema: bool) -> str:
    classes = meta.get("data", {}).get("classes") or []
    ema = meta.get("task_state", {}).get("ema", {})
    weights = (f"the EMA of the weights (decay {ema.get('decay')}, {ema.get('updates')} updates), as `megalm "
               f"sample` uses" if use_ema else "the trained weights (the checkpoint holds no EMA)")
    d = meta["config"]["diffusion"]
    objective = ("rectified flow: x_t = (1 - s) x0 + s noise, the model predicts noise - x0 at timestep s * 1000"
                 if d["objective"] == "flow" else
                 f"DDPM, {d['schedule']} schedule over {d['timesteps']} steps, predicting "
                 f"{'the noise' if d['prediction'] == 'eps' else 'v'}")
    sampler = "euler" if d["objective"] == "flow" else "ddpm"
    if d["objective"] == "flow":
        loop = ("sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())  # megalm's Euler grid\n"
                "x = torch.randn(shape, generator=gen)")
    else:
        loop = (f"ts = torch.linspace({d['timesteps'] - 1}, 0, steps).round().long().unique_consecutive().tolist()\n"
                "sched.set_timesteps(timesteps=ts)  # megalm's respacing; its ancestral DDPM sampler\n"
                "x = torch.randn(shape, generator=gen)")
    model_line = (f"DiT, {c.depth} blocks, width {c.dim}, {c.heads} heads, patch {c.patch_size}, "
                  f"on {c.channels}-channel {c.image_size}x{c.image_size} images in [-1, 1] "
                  f"(pixel space: there is no VAE).")
    labels = (f"{c.num_classes} ({', '.join(map(str, classes[:20])) or 'unconditional'}); class index "
              f"{c.num_classes} is the null class for classifier-free guidance.")
    y = "torch.tensor([3] * n)" if c.num_classes else "torch.zeros(n, dtype=torch.long)  # unconditional: row 0"
    return f"""# DiT exported from megalm

- Source: `{source}` (step {meta.get('step')}); weights: {weights}.
- Model: {model_line}
- Classes: {labels}
- Objective: {objective}.
- Scheduler: `scheduler/` is diffusers' `{sched['_class_name']}` with that schedule.

`transformer/` is a `DiTTransformer2DModel` whose output equals megalm's DiT on the same (x, t, y)
in fp32. The condition embedding, shared by all blocks in megalm, is stored once per block as
diffusers expects. There is no `model_index.json`: diffusers' `DiTPipeline` decodes latents with
a VAE, and this model works on pixels. Sample with the two parts directly:

```python
import torch
from diffusers import DiTTransformer2DModel, {sched['_class_name']}

model = DiTTransformer2DModel.from_pretrained("DIR/transformer").eval()
sched = {sched['_class_name']}.from_pretrained("DIR/scheduler")
n, steps, gen = 8, 50, torch.Generator().manual_seed(0)
shape, y = (n, {c.channels}, {c.image_size}, {c.image_size}), {y}
{loop}
with torch.no_grad():
    for t in sched.timesteps:
        out = model(x, t.expand(n), class_labels=y).sample[:, :{c.channels}]
        x = sched.step(out, t, x, generator=gen).prev_sample
images = x.clamp(-1, 1)
```

For guidance w, run the null class (`class_labels` = {c.num_classes}) too and use
`uncond + w * (cond - uncond)` as `out`. This loop reproduces `megalm sample --sampler {sampler}`.
megalm's default samplers have no exact diffusers twin: `FlowMatchHeunDiscreteScheduler`'s grid
stops at sigma = 1/1000 (megalm's Heun goes to 0), and `DDIMScheduler` steps from t to t - T/steps
rather than to the next respaced timestep (megalm's DDIM).
"""
