#!/usr/bin/env python
"""Kernels and host syncs per optimizer step, on CPU: `megalm train`'s step (the shipped
gpt2-124m config's structure and defaults — bf16, ZeRO-1, 4 micro batches per step, grad clip
— at a width that runs here) against a plain PyTorch loop driving the same nn.Module (bf16
autocast, fused AdamW, clip_grad_norm_, zero_grad(set_to_none)).

On a GPU the step was host-bound (issue 19: ~11,300 kernels per optimizer step, 5.6x a plain
loop); most of the difference is per-parameter work that the CPU shows just as well. Each aten
op reaching the dispatcher is counted (view ops excluded: they launch nothing) with a
TorchDispatchMode over one step after warm-up; `_local_scalar_dense` counts reads of a device
value by the host (.item(), .tolist(), bool(t)): each is a host sync on a GPU.

    python benchmarks/opcount_cpu.py [--zero 0 1 2 3] [--out benchmarks/results/opcount_cpu.json]

Prints JSON: per ZeRO stage both counts, `kernels_ratio` (megalm / plain) and the ops megalm adds.

Read with care: on CPU megalm's fused ops run their PyTorch references. FusedAdamW's step is
counted as the multi_tensor_adamw launches its CUDA path makes (host.cpp's batching), not as the
reference's per-tensor ops; the model's fused ops (norms, CE, ...) are counted as their references'
ops on both sides (the same module), and the CE checks labels on the host on CPU only. What
DeepSpeed adds per parameter (overflow checks, norms, bucket copies) runs the same on both.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIEWS = {"view", "t", "detach", "slice", "unsqueeze", "squeeze", "transpose", "expand", "_unsafe_view",
         "as_strided", "alias", "permute", "select", "_reshape_alias", "split", "split_with_sizes", "unbind",
         "reshape", "flatten", "unflatten", "chunk", "narrow", "view_as_real", "view_as_complex", "lift_fresh"}
SYNC = "_local_scalar_dense"
# gpt2-124m's structure (LayerNorm with bias, GELU, learned positions, tied head) and its batch
# layout per rank (micro batch 16 x 4 accumulation at global 512 on 8 GPUs), shrunk to run here.
SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.vocab_size=512", "model.mlp_hidden=256", "data.seq_len=64",
         "batch.micro_batch=2", "batch.global_batch=8"]


# megalm/ops/csrc/launch.h: one multi_tensor_adamw launch holds at most this many tensors and blocks.
ADAM_MAX_TENSORS, ADAM_MAX_BLOCKS, ADAM_CHUNK = 24, 320, 65536


def adamw_launches(numels: list[int]) -> int:
    """Kernel launches of one multi_tensor_adamw call over tensors of these sizes (host.cpp's
    batching: a launch when its tensor or block slots are full; a tensor may carry over)."""
    launches = tensors = blocks = 0
    for n in (n for n in numels if n):
        tensors += 1
        chunks = -(-n // ADAM_CHUNK)
        for c in range(chunks):
            blocks += 1
            if blocks == ADAM_MAX_BLOCKS or (tensors == ADAM_MAX_TENSORS and c == chunks - 1):
                launches += 1
                tensors, blocks = (1 if c < chunks - 1 else 0), 0
    return launches + (blocks > 0)


def counter():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megalm.ops.adamw import FusedAdamW

    class Count(TorchDispatchMode):
        """aten ops reaching the dispatcher, and host reads: `.tolist()` reads the data without
        an aten op, so it is counted where it is called."""

        def __init__(self):
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()
            self.reads: collections.Counter[str] = collections.Counter()  # host reads by call site
            self._in_adamw = False

        def _read(self) -> None:
            self.ops[SYNC] += 1
            self.reads[_call_site()] += 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket).split(".", 1)[-1]
            if self._in_adamw:
                pass
            elif name == SYNC:
                self._read()
            elif name not in VIEWS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

        def __enter__(self):
            real = self._tolist = torch.Tensor.tolist

            def tolist(t, *a, **kw):
                self._read()
                return real(t, *a, **kw)

            # On CPU FusedAdamW steps tensor by tensor (its reference; reading each CPU step counter);
            # on a GPU the same step is multi_tensor_adamw: counted as the launches that makes, as
            # torch's fused AdamW in the plain loop counts as its one aten op per param group.
            step_reference = self._step_reference = FusedAdamW._step_reference

            def counted_step(opt, params, master_weights, hyper):
                self._in_adamw = True
                try:
                    groups: dict[tuple, list[int]] = collections.defaultdict(list)
                    for p in params:  # _step_cuda's launch groups: dtype, master copy, step count
                        st = opt.state.get(p, {})
                        has_master = master_weights and p.dtype in (torch.bfloat16, torch.float16)
                        groups[(p.dtype, has_master, float(st["step"]) if st else 0.0)].append(p.numel())
                    self.ops["multi_tensor_adamw"] += sum(adamw_launches(n) for n in groups.values())
                    return step_reference(opt, params, master_weights, hyper)
                finally:
                    self._in_adamw = False

            torch.Tensor.tolist = tolist
            FusedAdamW._step_reference = counted_step
            return super().__enter__()

        def __exit__(self, *exc):
            torch.Tensor.tolist = self._tolist
            FusedAdamW._step_reference = self._step_reference
            return super().__exit__(*exc)

    return Count, torch


def _call_site() -> str:
    """The innermost caller outside torch and this file: file:line function."""
    import traceback

    for f in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in f.filename and not f.filename.endswith("opcount_cpu.py"):
            parts = f.filename.split("/")
            return f"{'/'.join(parts[-2:])}:{f.lineno} {f.name}"
    return "?"


def _summary(count) -> dict:
    return {"kernels": sum(count.ops.values()), "host_syncs": count.ops.get(SYNC, 0),
            "host_reads_by_site": dict(count.reads.most_common())}


def measure(zero: int, shards: str, work: str, warmup: int = 2) -> dict:
    Count, torch = counter()
    from megalm.train.config import load_config
    from megalm.train.loop import Trainer
    from megalm.train.task import LMTask

    over = [f"name=opcount-z{zero}", f"data.paths=[{shards}]", f"parallel.zero_stage={zero}",
            f"checkpoint.dir={work}/z{zero}", "eval.batches=0", "logging.progress=false", *SHAPE]
    cfg = load_config(str(REPO / "configs" / "gpt2-124m.yaml"), over, world_size=1)
    trainer = Trainer(cfg, LMTask(cfg), rank=0, world_size=1)
    try:
        for _ in range(warmup):
            trainer.train_step(trainer.next_batch())
        batch = trainer.next_batch()
        with Count() as ours:
            trainer.train_step(batch)
        params = sum(1 for _ in trainer.engine.module.parameters())
    finally:
        trainer.close()

    torch.manual_seed(cfg.train.seed)
    model = LMTask(cfg).build_model()
    o = cfg.optimizer
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)

    def plain_step(micro):
        for mb in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(mb["input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"],
                             labels=mb["labels"])
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        plain_step(trainer.next_batch())
    batch = trainer.next_batch()
    with Count() as plain:
        plain_step(batch)
    extra = {k: ours.ops[k] - plain.ops.get(k, 0) for k in ours.ops if ours.ops[k] > plain.ops.get(k, 0)}
    return {"zero_stage": zero, "parameters_tensors": params, "micro_batches_per_step": len(batch),
            "megalm": _summary(ours), "plain_loop": _summary(plain),
            "kernels_ratio": round(sum(ours.ops.values()) / sum(plain.ops.values()), 4),
            "megalm_extra_ops": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:15])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from launcher.env import free_port

    # One rank, no launcher: the trainer's own single-process start (as `megalm train` without one).
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(1)
    from megalm.engine.runtime import init_distributed
    from tests.distributed.corpus import make_corpus

    work = tempfile.mkdtemp(prefix="megalm-opcount-")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's and the trainer's chatter: stdout is the JSON
        init_distributed()
        shards = make_corpus(os.path.join(work, "shards"))
        rows = [measure(z, shards, work) for z in a.zero]
    import deepspeed

    out = {"benchmark": "opcount_cpu", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "config": "configs/gpt2-124m.yaml",
           "overrides": SHAPE, "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
