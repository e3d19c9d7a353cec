#!/usr/bin/env python
"""Training speed on one GPU: `megalm train` at the shipped configs' defaults against the
nanoGPT-style loop a user would write instead (benchmarks/plain_loop.py), eager and under
torch.compile, same shape, batch and precision, in one run.

    make bench-gpu                      # ops build + this, JSON to benchmarks/results/train_gpu.json
    python benchmarks/train_gpu.py [--out FILE] [--data DIR] [--skip-compile] [--llama-compile]
    python benchmarks/train_gpu.py --smoke --data SHARDS   # CPU: tiny shapes, checks the harness

Rows (each in its own process, so one row's memory or compile cache never helps another):
- GPT-2 124M (`configs/gpt2-124m.yaml`: bf16, document masks, fused CE, micro batch 16, seq 1024):
  megalm at ZeRO 1 (the shipped stage), 0, 2 and 3; the recipe config; nanoGPT eager and compiled.
- Llama-style ~1B (`configs/llama3-1b.yaml`: RMSNorm, SwiGLU, RoPE, GQA, seq 2048, micro batch 8):
  megalm at ZeRO 1; the plain loop eager (and compiled with --llama-compile).

Batch: each config's per-GPU share of its shipped global batch on 8 GPUs (gpt2: 16 x 4 micro
batches, llama: 8 x 8), so one optimizer step amortises the same number of micro batches as in the
8-GPU job. Vocabularies are the real models' (50304, 128256): the tokenizer trained by `megalm prep`
on the embedded corpus uses the first 8000 ids. No sample repeats within a row.

Per row: tokens/s (timed steps after warm-up, synchronised), MFU (6N + 12·L·d·T FLOPs per token,
PaLM's formula, for every row alike; the GPU's dense bf16 peak), peak memory, and from a
torch.profiler window of one optimizer step: kernels (plus memcpy/memset) per step, the GPU-busy
fraction of the step's wall time, pageable host→device copies, host synchronisations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPT2 = {"config": "configs/gpt2-124m.yaml", "vocab": 50304, "micro": 16, "accum": 4, "seq": 1024,
        "warmup": 5, "steps": 20}
LLAMA = {"config": "configs/llama3-1b.yaml", "vocab": 128256, "micro": 8, "accum": 8, "seq": 2048,
         "warmup": 2, "steps": 4}
# --smoke: the GPT-2 config's structure at a CPU size; only checks that every path runs.
SMOKE = {"config": "configs/gpt2-124m.yaml", "vocab": 512, "micro": 2, "accum": 2, "seq": 64, "warmup": 1,
         "steps": 2, "model": ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
                               "model.mlp_hidden=256"]}
ROW_TAG = "BENCH_ROW "
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


# ---- one row, in a child process --------------------------------------------------------------------
def _profile(step, cuda: bool) -> dict[str, Any]:
    """One optimizer step under torch.profiler: what the GPU ran and how busy it was."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        with record_function("bench_step"):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if not cuda:
        return {"kernels_per_step": None, "gpu_busy_fraction": None, "pageable_h2d_copies": None,
                "host_syncs_per_step": None}
    gpu = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    outer = next(e for e in events if e.name == "bench_step")
    start = outer.time_range.start
    end = max([outer.time_range.end] + [g[1] for g in gpu])
    busy, cur_s, cur_e = 0.0, None, None
    for s, e, _ in gpu:  # union of the device intervals
        if cur_e is None or s > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    syncs = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in SYNC_CALLS)
    return {"kernels_per_step": len(gpu), "gpu_busy_fraction": round(busy / max(end - start, 1e-9), 4),
            "pageable_h2d_copies": sum(1 for g in gpu if "Pageable" in g[2] and "HtoD" in g[2]),
            "host_syncs_per_step": syncs - 1}  # less the synchronize that closes the window


def _timed(step, warmup: int, steps: int, cuda: bool) -> list[float]:
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _megalm_row(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from megalm.train.config import load_config
    from megalm.engine.runtime import init_distributed
    from megalm.train.loop import Trainer
    from megalm.train.task import build_task

    init_distributed()
    shape = spec["shape"]
    over = [f"data.paths=[{spec['shards']}]", f"model.vocab_size={shape['vocab']}", f"data.seq_len={shape['seq']}",
            f"batch.micro_batch={shape['micro']}", f"batch.global_batch={shape['micro'] * shape['accum']}",
            f"checkpoint.dir={spec['work']}/ckpt", "eval.batches=0", "logging.progress=false",
            f"name=bench-{spec['name']}", *shape.get("model", []), *spec.get("overrides", [])]
    cfg = load_config(str(REPO / shape["config"]), over, world_size=1)
    trainer = Trainer(cfg, build_task(cfg), rank=0, world_size=1)
    cuda = trainer.device.type == "cuda"
    try:
        def step() -> None:
            trainer.train_step(trainer.next_batch())

        times = _timed(step, shape["warmup"], shape["steps"], cuda)
        prof = _profile(step, cuda)
        flops = trainer.b.flops_per_token
    finally:
        trainer.close()
    return {"times": times, "flops_per_token": flops, **prof,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def _plain_row(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from benchmarks.plain_loop import GPT2 as PlainGPT2, Llama, PlainLoop

    shape = spec["shape"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    m = spec["model"]
    if m["kind"] == "gpt2":
        model = PlainGPT2(shape["vocab"], m["dim"], m["n_layers"], m["n_heads"], shape["seq"])
    else:
        model = Llama(shape["vocab"], m["dim"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["hidden"],
                      shape["seq"], m["rope_theta"])
    tokens = np.memmap(spec["tokens"], dtype=np.uint16, mode="r")
    loop = PlainLoop(model, tokens, shape["micro"], shape["seq"], shape["accum"], device, spec["compile"])
    times = _timed(loop.step, shape["warmup"], shape["steps"], cuda)
    prof = _profile(loop.step, cuda)
    return {"times": times, **prof, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run_row(spec: dict[str, Any]) -> None:
    out = _megalm_row(spec) if spec["kind"] == "megalm" else _plain_row(spec)
    print(ROW_TAG + json.dumps(out), flush=True)


# ---- the parent ---------------------------------------------------------------------------------------
def _child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    from launcher.env import free_port

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(ROW_TAG)]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-4000:]
        print(f"row {spec['name']} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    row = json.loads(lines[-1][len(ROW_TAG):])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _summarise(row: dict[str, Any], shape: dict[str, Any], flops_per_token: int, peak: float | None) -> dict:
    if "error" in row:
        return row
    step_s = statistics.median(row.pop("times"))
    tokens = shape["micro"] * shape["accum"] * shape["seq"]
    tps = tokens / step_s
    row.pop("flops_per_token", None)
    return {"tokens_per_s": round(tps, 1), "step_s": round(step_s, 5),
            "mfu": round(tps * flops_per_token / peak, 4) if peak else None, **row}


def prepare_data(data: Path, workers: int) -> tuple[str, str]:
    """`megalm prep` of the embedded corpus (kept in `data` for later runs), and nanoGPT's flat
    uint16 token file of the same train split (documents joined by EOS)."""
    import numpy as np
    import pyarrow as pa

    shards = data / "shards"
    if not (shards / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "megalm.cli", "prep", "builtin:python-docs", "-o", str(shards),
               "--vocab-size", "8000", "--workers", str(workers)]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    flat = data / "train-tokens.u16"
    if not flat.is_file():
        manifest = json.loads((shards / "manifest.json").read_text())
        eos = manifest["tokenizer"]["eos_id"]
        parts = []
        for f in sorted(shards.glob("train-*.arrow")):
            for doc in pa.ipc.open_file(str(f)).read_all().column("tokens").to_pylist():
                parts.append(np.asarray(doc + [eos], dtype=np.uint16))
        tmp = flat.with_suffix(".tmp")
        np.concatenate(parts).tofile(tmp)
        os.replace(tmp, flat)
    return str(shards), str(flat)


def _model(shape: dict[str, Any], shards: str) -> tuple[dict[str, Any], int]:
    """The megalm model config of this shape (as `megalm train` resolves it) and its FLOPs per
    token (built on the meta device: no memory)."""
    import torch

    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM
    from megalm.train.config import load_config
    from megalm.train.task import LMTask

    over = [f"data.paths=[{shards}]", f"model.vocab_size={shape['vocab']}", f"data.seq_len={shape['seq']}",
            *shape.get("model", [])]
    fields = LMTask(load_config(str(REPO / shape["config"]), over, world_size=1)).fingerprint()["model_config"]
    with torch.device("meta"):
        return fields, int(LLM(LLMConfig(**fields)).flops_per_token(shape["seq"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    p.add_argument("--data", default=str(REPO / "build" / "bench-data"),
                   help="where the prepared corpus is kept (made on first use)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the harness only")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--llama-compile", action="store_true", help="also the compiled plain loop at ~1B")
    p.add_argument("--row-timeout", type=float, default=300)
    a = p.parse_args()
    if a.row:
        run_row(json.loads(a.row))
        return 0
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("train_gpu: no CUDA GPU here (use --smoke on a CPU to check the harness)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    shards, flat = prepare_data(Path(a.data), min(16, os.cpu_count() or 1))
    from megalm.train.peak_flops import peak_flops

    peak = peak_flops("bf16")
    work = tempfile.mkdtemp(prefix="megalm-bench-")
    suites = [("gpt2_124m", SMOKE if a.smoke else GPT2)] + ([] if a.smoke else [("llama_1b", LLAMA)])
    result: dict[str, Any] = {}
    for suite, shape in suites:
        fields, flops = _model(shape, shards)
        base = {"shards": shards, "shape": shape}
        specs: list[dict[str, Any]] = []
        stages = [1] if (a.smoke or suite == "llama_1b") else [1, 0, 2, 3]
        for z in stages:
            specs.append({**base, "kind": "megalm", "name": f"megalm_zero{z}", "overrides": [f"parallel.zero_stage={z}"]})
        if suite == "gpt2_124m" and not a.smoke:
            specs.append({**base, "kind": "megalm", "name": "megalm_recipe", "overrides": [],
                          "shape": {**shape, "config": "configs/recipe-gpt2-124m.yaml"}})
        plain_model = ({"kind": "gpt2", "dim": fields["dim"], "n_layers": fields["n_layers"], "n_heads": fields["n_heads"]}
                       if suite == "gpt2_124m" else
                       {"kind": "llama", "dim": fields["dim"], "n_layers": fields["n_layers"],
                        "n_heads": fields["n_heads"], "n_kv_heads": fields["n_kv_heads"],
                        "hidden": fields["mlp_hidden"], "rope_theta": fields["rope_theta"]})
        compiled = not a.smoke and not a.skip_compile and (suite == "gpt2_124m" or a.llama_compile)
        for comp in [False] + ([True] if compiled else []):
            name = "nanogpt_compile" if comp else "nanogpt_eager"
            specs.append({**base, "kind": "plain", "name": name, "model": plain_model, "tokens": flat,
                          "compile": comp})
        rows = {}
        for spec in specs:
            spec["work"] = os.path.join(work, suite, spec["name"])
            row_flops = flops if spec["shape"] is shape else _model(spec["shape"], shards)[1]
            rows[spec["name"]] = _summarise(_child(spec, a.row_timeout), spec["shape"], row_flops, peak)
            print(f"{suite} {spec['name']}: {rows[spec['name']]}", file=sys.stderr, flush=True)
        out: dict[str, Any] = {"config": shape["config"], "seq_len": shape["seq"], "micro_batch": shape["micro"],
                               "grad_accum": shape["accum"], "vocab": shape["vocab"], "flops_per_token": flops,
                               "rows": rows}
        ours = rows["megalm_zero1"].get("tokens_per_s")
        for base_name in ("nanogpt_compile", "nanogpt_eager"):
            theirs = rows.get(base_name, {}).get("tokens_per_s")
            if ours and theirs:
                out[f"speedup_vs_{base_name}"] = round(ours / theirs, 3)
        k_ours, k_eager = rows["megalm_zero1"].get("kernels_per_step"), rows["nanogpt_eager"].get("kernels_per_step")
        if k_ours and k_eager:
            out["kernels_ratio_vs_nanogpt_eager"] = round(k_ours / k_eager, 3)
        recipe = rows.get("megalm_recipe", {}).get("tokens_per_s")
        if recipe and ours:
            out["recipe_vs_default_ratio"] = round(recipe / ours, 3)
        result[suite] = out
    import deepspeed

    doc = {"benchmark": "train_gpu", "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "peak_flops_bf16": peak, "torch": torch.__version__, "cuda": torch.version.cuda,
           "deepspeed": deepspeed.__version__, "smoke": a.smoke, **result,
           "wall_s": round(time.perf_counter() - started, 1)}
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        from megalm.fsio import atomic_write

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(a.out, text + "\n")
    failed = [f"{s}.{n}" for s in result for n, r in result[s]["rows"].items() if "error" in r]
    if failed:
        print(f"train_gpu: rows failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
