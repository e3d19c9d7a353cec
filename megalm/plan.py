"""`megalm plan CONFIG --gpus N --gpu h100`: will it fit, and how fast? Per-GPU memory for
parameters, gradients and optimizer states under each layout megalm trains with (ZeRO stage ×
pipeline stages, or tensor and/or sequence parallelism, the rest data parallel),
activations for the micro batch (with and without activation checkpointing), the largest micro
batch that fits, communication per step, and step time / tokens per second from the model's
FLOPs at an assumed MFU; the fastest layout that fits is named below the table.

The state model follows what DeepSpeed allocates (checked against its real partitions on 2 CPU
ranks in tests/plan, TP and SP included): ZeRO-1/2/3 keep an fp32 master copy of every parameter
partition even in fp32 training; AdamW adds two fp32 moments; ZeRO-k partitions optimizer state
(k>=1), gradients (k>=2) and parameters (k=3) over the data-parallel ranks (with sequence
parallelism: data × sequence ranks, DeepSpeed's ZeRO group). Tensor parallelism (AutoTP) holds
1/TP of each block's attention and MLP matrices; embeddings, norms and the head stay whole.
Activations follow Korthikanti et al. 2022 with fused attention (no s² term): s·b·h·(10 + 24/TP)
bytes per layer in 16-bit; Ulysses sequence parallelism divides s by SP; on the first pipeline
stage times the micro batches in flight.

Communication per GPU and step (ring collectives move (g-1)/g of the data per rank): ZeRO-0/1
all-reduce the gradients once per step (ZeRO-1 also all-gathers the updated parameters); ZeRO-2
reduce-scatters gradients every micro batch and all-gathers parameters once; ZeRO-3 all-gathers
parameters in forward and backward and reduce-scatters gradients every micro batch. TP: two
all-reduces of the activations per block in forward and two in backward; SP: four all-to-alls
(q, k, v, output) per block each way. TP and SP groups stay inside a node (NVLink); the data-
parallel traffic crosses nodes. The step is max(compute, data-parallel traffic) + TP/SP traffic:
DeepSpeed overlaps the first with backward, the others sit on the critical path. Activation
checkpointing adds a forward (compute × 4/3) when the layout needs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.models.config import LLMConfig
from megalm.models.presets import load_preset, preset_names
from megalm.train.config import load_config

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_flops: float  # dense bf16/fp16 FLOP/s
    node_gbs: float  # GB/s per GPU inside a node (NVLink; PCIe for L40S), one direction
    network_gbs: float  # GB/s per GPU between nodes (one 400G / 200G NIC per GPU)
    per_node: int = 8


GPUS = {
    "h100": GPU("H100 SXM 80GB", 80, 989e12, 450, 50),
    "h200": GPU("H200 141GB", 141, 989e12, 450, 50),
    "a100": GPU("A100 SXM 80GB", 80, 312e12, 300, 25),
    "a100-40gb": GPU("A100 40GB", 40, 312e12, 300, 25),
    "l40s": GPU("L40S 48GB", 48, 362e12, 32, 25),
    "b200": GPU("B200 180GB", 180, 2250e12, 900, 50),
}
# Kept free per GPU for the CUDA context, NCCL buffers, allocator fragmentation and workspaces.
RESERVE = 0.10


def param_count(m: LLMConfig) -> int:
    """Exactly LLM(m).num_params(), from the shapes alone (a 70B model is never built)."""
    d, hd, kv, h = m.dim, m.head_dim, m.n_kv_heads, m.ffn_hidden
    b = 1 if m.bias else 0
    attn = d * m.n_heads * hd + 2 * d * kv * hd + m.n_heads * hd * d + b * (m.n_heads * hd + 2 * kv * hd + d)
    mats = 3 if m.mlp == "swiglu" else 2
    mlp = mats * d * h + b * ((mats - 1) * h + d)
    norm = d * (2 if m.norm == "layernorm" and m.bias else 1)
    total = m.n_layers * (attn + mlp + 2 * norm) + norm + m.vocab_size * d
    if m.positions == "learned":
        total += m.max_seq_len * d
    if not m.tie_embeddings:
        total += d * m.vocab_size
    return total


def flops_per_token(m: LLMConfig, seq_len: int) -> int:
    """Training FLOPs per token as LLM.flops_per_token (PaLM: 6N' + 12·L·h·s)."""
    n = param_count(m) - (m.max_seq_len * m.dim if m.positions == "learned" else 0)
    if not m.tie_embeddings:
        n -= m.vocab_size * m.dim
    return 6 * n + 12 * m.n_layers * m.n_heads * m.head_dim * seq_len


def split_params(m: LLMConfig) -> int:
    """Parameters tensor parallelism splits (megalm.train.tensor's plan): each block's attention
    and MLP matrices and the biases that go with the column-split ones."""
    d, hd, kv, h = m.dim, m.head_dim, m.n_kv_heads, m.ffn_hidden
    b = 1 if m.bias else 0
    attn = 2 * d * m.n_heads * hd + 2 * d * kv * hd + b * (m.n_heads * hd + 2 * kv * hd)
    mats = 3 if m.mlp == "swiglu" else 2
    mlp = mats * d * h + b * (mats - 1) * h
    return m.n_layers * (attn + mlp)


def params_per_gpu(m: LLMConfig, tp: int = 1, pp: int = 1) -> float:
    """Parameters one GPU holds before ZeRO partitions them (pipeline stages split evenly)."""
    n, split = param_count(m), split_params(m)
    return (n - split + split / tp) / pp


def state_bytes(n_params: float, dtype: str, zero: int, dp: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states incl. fp32 master) bytes per GPU for `n_params`."""
    width = 4 if dtype == "fp32" else 2
    # Stage 0 in fp32 updates the parameters in place; everything else keeps an fp32 master copy.
    master = 0 if (zero == 0 and dtype == "fp32") else 4
    moments = 8
    optim = (master + moments) * n_params / (dp if zero >= 1 else 1)
    grads = width * n_params / (dp if zero >= 2 else 1)
    params = width * n_params / (dp if zero == 3 else 1)
    return params, grads, optim


def activation_bytes(m: LLMConfig, seq: int, micro: int, dtype: str, layers: int, checkpointing: bool,
                     in_flight: int, tp: int = 1, sp: int = 1) -> float:
    width = 4 if dtype == "fp32" else 2
    sbh = seq / sp * micro * m.dim
    per_layer = (5 + 12 / tp) * width * sbh  # (10 + 24/t)·s·b·h bytes at 2 bytes per element
    # Checkpointing keeps each block's input (whole on every TP rank); one block's activations
    # live during its recompute.
    stored = layers * (width * sbh if checkpointing else per_layer)
    recompute = per_layer if checkpointing else 0
    local = seq // sp
    logits_chunk = micro * min(local, 4096) * m.vocab_size * 4 / max(1, math.ceil(local / 4096))  # fused CE chunk
    return stored * in_flight + recompute + logits_chunk


def comm_bytes(m: LLMConfig, seq: int, micro: int, accum: int, dtype: str, zero: int, zero_group: int,
               tp: int, sp: int, pp: int) -> tuple[float, float]:
    """(data-parallel bytes, tensor/sequence-parallel bytes) one GPU sends per step."""
    width = 4 if dtype == "fp32" else 2
    n = params_per_gpu(m, tp, pp) * width
    ring = (zero_group - 1) / zero_group
    dp = {0: 2 * n, 1: 3 * n, 2: (accum + 1) * n, 3: 3 * accum * n}[zero] * ring
    layers = m.n_layers / pp
    act = micro * seq / sp * m.dim * width
    model = 0.0
    if tp > 1:
        model += layers * accum * 4 * 2 * (tp - 1) / tp * act
    if sp > 1:  # each all-to-all carries this TP rank's heads
        qkvo = (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim / m.dim * act / tp
        model += layers * accum * 2 * (sp - 1) / sp * qkvo
    return dp, model


@dataclass
class Row:
    zero: int
    pipeline: int
    tp: int
    sp: int
    dp: int
    params_gib: float
    grads_gib: float
    optim_gib: float
    act_gib: float
    act_ckpt_gib: float
    total_gib: float
    total_ckpt_gib: float
    fits: bool
    fits_ckpt: bool
    max_micro: int
    max_micro_ckpt: int
    comm_gib: float  # sent per GPU per step, all kinds
    step_s: float
    tokens_per_s: float
    note: str = ""


def layouts(m: LLMConfig, seq: int, gpus: int, gpu: GPU) -> list[tuple[int, int, int, int]]:
    """(zero, pp, tp, sp) megalm can run: pipelines alone (ZeRO <= 1, as DeepSpeed requires), or
    tensor and/or sequence parallelism inside a node (ZeRO 1/2 when both)."""
    out = []
    for pp in (1, 2, 4, 8, 16, 32, 64):
        if pp <= m.n_layers and gpus % pp == 0:
            out += [(zero, pp, 1, 1) for zero in ((0, 1, 2, 3) if pp == 1 else (0, 1))]
    for tp in (1, 2, 4, 8):
        for sp in (1, 2, 4, 8):
            k = tp * sp
            if k == 1 or k > gpu.per_node or gpus % k or m.n_heads % k or m.n_kv_heads % k:
                continue
            if tp > 1 and (m.ffn_hidden % tp or m.value_embeds):
                continue
            if seq % sp:
                continue
            out += [(zero, 1, tp, sp) for zero in ((1, 2) if sp > 1 and tp > 1 else (0, 1, 2, 3))]
    return out


def _rows(m: LLMConfig, seq: int, micro: int, global_batch: int, dtype: str, gpus: int, gpu: GPU,
          mfu: float) -> list[Row]:
    budget = gpu.memory_gib * (1 - RESERVE) * GIB
    tokens = global_batch * seq
    rows = []
    for zero, pp, tp, sp in layouts(m, seq, gpus, gpu):
        dp = gpus // (pp * tp * sp)
        note = ""
        if global_batch % (micro * dp):
            note = f"global batch {global_batch} not a multiple of micro batch × dp ({micro} × {dp})"
        accum = max(1, global_batch // (micro * dp))
        p, g, o = state_bytes(params_per_gpu(m, tp, pp), dtype, zero, dp * sp)
        layers = math.ceil(m.n_layers / pp)
        in_flight = min(pp, accum)

        def act(b: int, ckpt: bool) -> float:
            return activation_bytes(m, seq, b, dtype, layers, ckpt, in_flight, tp, sp)

        static = p + g + o

        def largest(ckpt: bool) -> int:
            b = 0
            while b < 4096 and static + act(b + 1, ckpt) <= budget:
                b += 1
            return b

        fits, fits_ckpt = static + act(micro, False) <= budget, static + act(micro, True) <= budget
        recompute = 1.0 if fits or not fits_ckpt else 4 / 3
        compute = flops_per_token(m, seq) * tokens / (gpus * gpu.peak_flops * mfu) * (1 + (pp - 1) / accum) * recompute
        dp_bytes, model_bytes = comm_bytes(m, seq, micro, accum, dtype, zero, dp * sp, tp, sp, pp)
        cross = gpu.network_gbs if gpus > gpu.per_node else gpu.node_gbs
        step = max(compute, dp_bytes / (cross * 1e9)) + model_bytes / (gpu.node_gbs * 1e9)
        rows.append(Row(zero, pp, tp, sp, dp, p / GIB, g / GIB, o / GIB, act(micro, False) / GIB,
                        act(micro, True) / GIB, (static + act(micro, False)) / GIB, (static + act(micro, True)) / GIB,
                        fits, fits_ckpt, largest(False), largest(True), (dp_bytes + model_bytes) / GIB, step,
                        tokens / step, note))
    return rows


def fastest(rows: list[Row]) -> Row | None:
    """The layout with the shortest step among those that fit (with checkpointing if needed)."""
    usable = [r for r in rows if r.fits_ckpt and not r.note]
    return min(usable, key=lambda r: r.step_s) if usable else None


def overrides_for(row: Row) -> str:
    """The config settings that run `row`."""
    out = [f"parallel.zero_stage={row.zero}"]
    out += [f"parallel.pipeline_stages={row.pipeline}"] if row.pipeline > 1 else []
    out += [f"parallel.tensor_parallel={row.tp}"] if row.tp > 1 else []
    out += [f"parallel.sequence_parallel={row.sp}"] if row.sp > 1 else []
    out += [] if row.fits else ["parallel.activation_checkpointing=true"]
    return " ".join(out)


def _fmt(rows: list[Row], header: str) -> str:
    cols = ["ZeRO", "PP", "TP", "SP", "DP", "params", "grads", "optim", "act", "act+ckpt", "total", "total+ckpt",
            "fits", "max mb", "max mb+ckpt", "comm GiB", "step s", "tok/s"]
    lines = [header, "  ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        fits = "yes" if r.fits else ("ckpt" if r.fits_ckpt else "no")
        vals = [r.zero, r.pipeline, r.tp, r.sp, r.dp, f"{r.params_gib:.2f}", f"{r.grads_gib:.2f}", f"{r.optim_gib:.2f}",
                f"{r.act_gib:.2f}", f"{r.act_ckpt_gib:.2f}", f"{r.total_gib:.2f}", f"{r.total_ckpt_gib:.2f}", fits,
                r.max_micro, r.max_micro_ckpt, f"{r.comm_gib:.3g}", f"{r.step_s:.3g}", f"{r.tokens_per_s:,.0f}"]
        lines.append("  ".join(f"{str(v):>10}" for v in vals) + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def load(config: str, overrides: list[str]):
    """A training config (YAML) or a model preset name; `overrides` as for megalm train."""
    if not Path(config).is_file() and config in preset_names():
        overrides = [f"model={config}", *overrides]
        config = None
    elif not Path(config).is_file():
        raise UserError(f"{config}: no such config file or model preset (presets: {', '.join(preset_names())})")
    # plan reads no data and runs no steps: a preset alone needs neither.
    extra = [] if config else ["data.paths=[unused]", "train.steps=1"]
    return load_config(config, extra + list(overrides))


def model_config(cfg) -> LLMConfig:
    """The model as the trainer would build it, without reading data: the preset's vocabulary
    unless the shard dir exists (the tokenizer's vocabulary wins there, as in training)."""
    fields = dict(cfg.model)
    preset = fields.pop("preset", None)
    base = load_preset(preset).to_dict() if preset is not None else {}
    base.update(fields)
    manifest = Path(cfg.data.paths[0]) / "manifest.json"
    if "vocab_size" not in fields and manifest.is_file():
        base["vocab_size"] = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
    base["max_seq_len"] = max(base.get("max_seq_len", 0), cfg.data.seq_len)
    return LLMConfig.from_dict(base, source=f"{cfg.source}: model")


def plan(cfg, gpus: int, gpu: GPU, mfu: float) -> tuple[LLMConfig, list[Row]]:
    m = model_config(cfg)
    return m, _rows(m, cfg.data.seq_len, cfg.batch.micro_batch, cfg.batch.global_batch, cfg.precision.dtype,
                    gpus, gpu, mfu)


def main(argv: list[str]) -> int:
    p = Parser(prog="megalm plan", description=__doc__.splitlines()[0])
    p.add_argument("config", help="training YAML, or a model preset name (gpt2-124m ... llama3-70b)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=8192 batch.micro_batch=1")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--json", action="store_true", help="rows as JSON")
    a = p.parse_args(argv)
    if a.gpu not in GPUS:
        raise UserError(f"--gpu: unknown GPU {a.gpu!r}; expected one of {', '.join(GPUS)}")
    if a.gpus < 1:
        raise UserError(f"--gpus: expected >= 1, got {a.gpus}")
    if not 0 < a.mfu <= 1:
        raise UserError(f"--mfu: expected 0 < mfu <= 1, got {a.mfu}")
    cfg = load(a.config, a.overrides)
    gpu = GPUS[a.gpu]
    m, rows = plan(cfg, a.gpus, gpu, a.mfu)
    n = param_count(m)
    if a.json:
        best = fastest(rows)
        print(json.dumps({"params": n, "gpu": asdict(gpu), "rows": [asdict(r) for r in rows],
                          "fastest": asdict(best) if best else None}, indent=1))
    else:
        print(_fmt(rows, f"{n / 1e9:.3g}B parameters, seq {cfg.data.seq_len}, micro batch {cfg.batch.micro_batch}, "
                         f"global batch {cfg.batch.global_batch}, {cfg.precision.dtype}, {a.gpus} × {gpu.name} "
                         f"({gpu.memory_gib:g} GiB, {RESERVE:.0%} reserved), MFU {a.mfu:g}; sizes in GiB per GPU"))
        best = fastest(rows)
        if best is not None:
            print(f"fastest that fits: {overrides_for(best)} ({best.step_s:.3g} s per step, "
                  f"{best.tokens_per_s:,.0f} tokens/s)")
    if fastest(rows) is None:
        best = min(rows, key=lambda r: r.total_ckpt_gib)
        raise UserError(
            f"{a.config}: does not fit on {a.gpus} × {gpu.name}: the smallest layout ({overrides_for(best)}) "
            f"needs {best.total_ckpt_gib:.1f} GiB per GPU with activation checkpointing (params {best.params_gib:.1f} + grads {best.grads_gib:.1f} + optimizer "
            f"{best.optim_gib:.1f} + activations {best.act_ckpt_gib:.1f}) but {gpu.memory_gib * (1 - RESERVE):.0f} GiB "
            f"is usable; use more GPUs, a smaller micro batch or sequence, or a larger GPU")
    return 0
