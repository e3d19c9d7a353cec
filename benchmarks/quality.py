#!/usr/bin/env python
"""Model quality at equal wall-clock on CPU: held-out bits per byte after a fixed training budget.

Three configurations, each trained by `megalm train` (one process, DeepSpeed ZeRO-0, fp32) on the
same embedded corpus (`builtin:python-docs`: Python's help topics + standard-library docstrings),
same tokenizer and sequence length:
  nanogpt  GPT-2 architecture (learned positions, LayerNorm with biases, GELU MLP, tied head) with
           nanoGPT's small-model AdamW settings (lr 1e-3, betas 0.9/0.99, weight decay 0.1, clip 1)
  default  megalm's default CPU config: configs/demo.yaml (tiny Llama-style model, AdamW)
  recipe   configs/recipe-tiny.yaml (Muon, QK-norm, ReLU², zero-init projections, soft-cap, ...)

Equal time: each configuration gets the step count that takes `--budget` seconds of training on
an UNLOADED machine: steps = budget / (20th-percentile step time of a 24-step calibration run,
first 4 steps dropped). The machine is shared: other users' load changed a step's wall-clock 2-3x
within minutes, so a median step time (or the CPU time of the process, whose start-up spawns a
variable amount of compiler work) over- or under-shot the budget by up to 2x; the fast steps are
the ones the load did not slow. The LR schedule then decays over exactly those steps. Seeds are
interleaved across the configurations (seed 1 of each, then seed 2 of each, ...) so the load
hits them alike; each run's wall-clock training seconds (inflated by the load) and the load
average are recorded.

Score: every 40th document is held out (never trained on, not seen by the tokenizer trainer);
bits/byte = summed next-token NLL / ln 2 / the UTF-8 bytes of the held-out ORIGINAL text. As in
training, each document's first token is context and its EOS is predicted.

    python benchmarks/quality.py [--budget 90] [--seeds 3] [--out benchmarks/results/quality.json]

Prints JSON with tokens seen, steps and bits/byte per run, medians, and
`recipe_vs_nanogpt_bpb_ratio`, `default_vs_nanogpt_bpb_ratio` (< 1: better than the baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalm import CONFIGS_DIR  # noqa: E402

SEQ_LEN, VOCAB, HOLDOUT_EVERY = 128, 2048, 40
# nanoGPT's model.py at the `tiny` preset's width/depth; its config/train_shakespeare_char.py AdamW
# settings (the small-model ones), dropout 0 as nanoGPT advises for pretraining, warmup scaled to
# a run of a few hundred steps.
NANOGPT = {
    "model": {"preset": "tiny", "n_kv_heads": 4, "mlp": "gelu", "mlp_hidden": 512, "norm": "layernorm",
              "positions": "learned", "bias": True, "tie_embeddings": True},
    "optimizer": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 10, "schedule": "cosine", "weight_decay": 0.1,
                  "betas": [0.9, 0.99], "grad_clip": 1.0},
    "batch": {"micro_batch": 8, "global_batch": 32},
}
CONFIGS: dict[str, Any] = {"nanogpt": NANOGPT, "default": CONFIGS_DIR / "demo.yaml",
                           "recipe": CONFIGS_DIR / "recipe-tiny.yaml"}


# ---- corpus ------------------------------------------------------------------------------------
def prepare_corpus(work: Path) -> tuple[str, list[str], dict[str, Any]]:
    """(shard dir of the training documents, held-out texts, corpus facts)."""
    from data_prep.builtin import iter_python_docs

    docs = list(iter_python_docs())
    held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    jsonl = work / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in train))
    shards = work / "shards"
    _run([sys.executable, "-m", "megalm.cli", "prep", str(jsonl), "-o", str(shards), "--vocab-size", str(VOCAB),
          "--valid-fraction", "0.002", "--workers", "2"], cwd=work)
    facts = {"source": "builtin:python-docs", "documents": len(docs), "train_documents": len(train),
             "train_bytes": sum(len(d.encode()) for d in train), "heldout_documents": len(held),
             "heldout_bytes": sum(len(d.encode()) for d in held), "tokenizer": f"sentencepiece BPE {VOCAB}",
             "train_tokens": int(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["tokens"])}
    return str(shards), held, facts


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


# ---- one training run ------------------------------------------------------------------------------
def config_file(name: str, spec: Any, work: Path) -> Path:
    if isinstance(spec, Path):
        return spec
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **spec}))
    return path


def train(name: str, config: Path, shards: str, steps: int, seed: int, work: Path,
          extra: list[str] = ()) -> dict[str, Any]:
    """Train `steps` steps in a fresh folder; returns steps, tokens, training seconds, run folder."""
    from megalm.train.config import load_config

    run = work / f"{name}-s{seed}-n{steps}-{time.monotonic_ns()}"
    run.mkdir(parents=True)
    overrides = [f"name={name}", f"data.paths=[{shards}]", f"data.seq_len={SEQ_LEN}", f"data.seed={seed}",
                 f"train.seed={seed}", f"train.steps={steps}", "train.tokens=0", f"model.vocab_size={VOCAB}",
                 f"model.max_seq_len={SEQ_LEN}", "parallel.zero_stage=0", "precision.dtype=fp32",
                 "logging.interval=1", "logging.progress=false", "eval.interval=0", "eval.batches=0",
                 f"checkpoint.interval={steps + 1}", "checkpoint.keep_last=1", *extra]
    # One process: the whole step's batch in one forward (no accumulation), for every config.
    overrides.append(f"batch.micro_batch={load_config(str(config), overrides).batch.global_batch}")
    load, cpu0, t0 = os.getloadavg()[0], _child_cpu_s(), time.perf_counter()
    _run([sys.executable, "-m", "megalm.cli", "train", str(config), *overrides, "--resume", "none"], cwd=run)
    wall, cpu = time.perf_counter() - t0, _child_cpu_s() - cpu0
    recs = [json.loads(line) for line in (run / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"]
    per_step = recs[-1]["tokens"] / max(recs[-1]["step"], 1)
    step_s = [per_step / r["tokens_per_s"] for r in recs]  # logging.interval=1: one record per step
    return {"run": run, "steps": recs[-1]["step"], "tokens": recs[-1]["tokens"], "step_s": step_s,
            "train_s": sum(step_s), "process_s": wall, "process_cpu_s": cpu, "load_avg_at_start": load}


# ---- held-out bits per byte --------------------------------------------------------------------------
@torch.no_grad()
def heldout_bpb(run: Path, name: str, texts: list[str], shards: str) -> float:
    import sentencepiece as spm

    from megalm.models.load import load_model

    model, _ = load_model(str(run / "runs" / name / "checkpoints"))
    sp = spm.SentencePieceProcessor(model_file=str(Path(shards) / "tokenizer.model"))
    eos = json.loads((Path(shards) / "manifest.json").read_text())["tokenizer"]["eos_id"]
    windows = []
    for ids in sp.encode(texts):
        stream = ids + [eos]
        # Windows of SEQ_LEN + 1 overlapping by one token: every token after the first is a target once.
        for start in range(0, len(stream) - 1, SEQ_LEN):
            windows.append(stream[start:start + SEQ_LEN + 1])
    nll, count = 0.0, 0
    for i in range(0, len(windows), 32):
        chunk = windows[i:i + 32]
        width = max(len(w) for w in chunk) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, w in enumerate(chunk):  # right padding never reaches real tokens (causal attention)
            ids[row, :len(w) - 1] = torch.tensor(w[:-1])
            labels[row, :len(w) - 1] = torch.tensor(w[1:])
        logits = model(ids).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        count += int((labels != -100).sum())
    heldout_bytes = sum(len(t.encode()) for t in texts)
    return nll / math.log(2) / heldout_bytes


# ---- the benchmark -----------------------------------------------------------------------------------
def calibrate(configs: dict[str, Path], shards: str, work: Path, budget: float, passes: int,
              steps: int = 24) -> dict[str, dict[str, Any]]:
    """Steps per config so training takes `budget` s unloaded: the 20th percentile of the step
    times after 4 warm-up steps, over `passes` interleaved calibration runs."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(passes):
        for name, cfg in configs.items():
            times[name] += train(name, cfg, shards, steps, 0, work / "calibration")["step_s"][4:]
    plan = {}
    for name, t in times.items():
        fast = statistics.quantiles(t, n=5)[0]
        plan[name] = {"step_s_p20": fast, "step_s_median": statistics.median(t), "steps": max(10, int(budget / fast))}
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per run (default 90)")
    p.add_argument("--seeds", type=int, default=3)
    # One thread: on the shared 2-core machine a second thread per process loses more to
    # contention than it gains (benchmarks/train_cpu.py measured the same).
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--calibration-passes", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated subset of nanogpt,default,recipe")
    p.add_argument("--steps", default="", help="skip calibration for these: name=steps,... (e.g. to rerun one "
                                               "config at a step count measured before)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(CONFIGS)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megalm-quality-") as tmp:
        work = Path(tmp)
        shards, held, corpus = prepare_corpus(work)
        configs = {n: config_file(n, CONFIGS[n], work) for n in names}
        fixed = {k: int(v) for k, v in (item.split("=") for item in args.steps.split(",") if item)}
        plan = calibrate({n: c for n, c in configs.items() if n not in fixed}, shards, work, args.budget,
                         args.calibration_passes) if set(names) - set(fixed) else {}
        plan.update({n: {"steps": fixed[n], "given": True} for n in fixed})
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for seed in range(1, args.seeds + 1):  # interleaved: seed s of every config, then s + 1
            for n in names:
                r = train(n, configs[n], shards, plan[n]["steps"], seed, work)
                r["bpb"] = heldout_bpb(r["run"], n, held, shards)
                r.pop("run"), r.pop("step_s")
                runs[n].append({"seed": seed, **{k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in r.items()}})
                print(json.dumps({"config": n, **runs[n][-1]}), file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "benchmark": "quality", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "threads": args.threads, "budget_s": args.budget, "seq_len": SEQ_LEN,
        "budget_kind": "seconds of single-threaded training on an unloaded core (see the docstring)",
        "corpus": corpus, "calibration": {n: {k: round(v, 4) for k, v in c.items()} for n, c in plan.items()},
        "configs": {n: (str(CONFIGS[n].relative_to(REPO)) if isinstance(CONFIGS[n], Path) and
                        CONFIGS[n].is_relative_to(REPO) else str(CONFIGS[n])) for n in names},
        "runs": runs, "total_s": round(time.perf_counter() - t_start, 1),
    }
    for n in names:
        result[f"{n}_bpb_median"] = round(statistics.median(r["bpb"] for r in runs[n]), 4)
        result[f"{n}_tokens_median"] = statistics.median(r["tokens"] for r in runs[n])
        result[f"{n}_train_s_median"] = round(statistics.median(r["train_s"] for r in runs[n]), 1)
    if "nanogpt" in names:
        for n in ("recipe", "default"):
            if n in names:
                result[f"{n}_vs_nanogpt_bpb_ratio"] = round(result[f"{n}_bpb_median"] / result["nanogpt_bpb_median"], 4)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from megalm.fsio import atomic_write

        atomic_write(args.out, text + "\n")


if __name__ == "__main__":
    main()
