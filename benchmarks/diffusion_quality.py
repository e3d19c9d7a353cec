#!/usr/bin/env python
"""Sample quality of a class-conditional DiT trained on CPU, measured by numbers.

1. `megalm prep builtin:digits` (scikit-learn's 1,797 8x8 digits; train/valid split by hash).
2. A small CNN classifier trained on the train split (its valid accuracy is reported; >= 95%).
3. `megalm launch --nproc 2 -- megalm train configs/diffusion-digits.yaml` (2 CPU ranks of one
   thread each, ZeRO-2 as configured: faster here than 1 rank with 2 threads) with a constant learning
   rate (the EMA does the averaging), stopped by SIGTERM — the trainer's preemption path: it
   checkpoints at the end of the step — once the fixed budget (default 300 s wall time, start-up
   included) is spent. The number of steps therefore depends on the machine's load (reported).
4. From the EMA weights, `--per-class` samples per class at each guidance scale (Heun, 12 steps).
5. Per scale: the share the classifier recognises as the class asked for, and the Fréchet
   distance of its features to the held-out real digits (reference: train vs valid real digits).

    python benchmarks/diffusion_quality.py [--budget-s 300] [--out benchmarks/results/diffusion_quality.json]

Prints JSON; the goal is accuracy >= 0.95 at some guidance > 1, and better than guidance 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs/diffusion-digits.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=300.0, help="wall time of the whole `megalm train` run")
    p.add_argument("--max-steps", type=int, default=20000, help="never reached on 2 CPU cores in 300 s")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--sampler-steps", type=int, default=12)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/diffusion_quality.json"))
    p.add_argument("--grid", default="", help="also write the best scale's grid as PNG here")
    args = p.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()

    from data_prep.images import load_digits_images, write_shards
    from megalm.diffusion.data import load_image_manifest, read_split, to_model_range
    from megalm.diffusion.quality import accuracy, features, frechet_distance, train_classifier
    from megalm.diffusion.sample import from_checkpoint, generate
    from megalm.train.config import load_config

    work = tempfile.mkdtemp(prefix="megalm-dq-")
    shards = os.path.join(work, "digits")
    write_shards(load_digits_images(), shards, 0.2, 64.0, "builtin:digits")
    m = load_image_manifest(shards)
    train_x, train_y = read_split(m, "train")
    valid_x, valid_y = read_split(m, "valid")
    train_x, valid_x = to_model_range(train_x), to_model_range(valid_x)

    t0 = time.perf_counter()
    clf = train_classifier(train_x, train_y, m.num_classes)
    clf_s = time.perf_counter() - t0
    clf_acc = accuracy(clf, valid_x, valid_y)
    real_valid = features(clf, valid_x)
    fd_real = frechet_distance(features(clf, train_x), real_valid)

    overrides = [f"data.paths=[{shards}]", "logging.progress=false", "diffusion.grid_interval=0",
                 "optimizer.schedule=constant", "optimizer.warmup_steps=50",
                 f"train.steps={args.max_steps}", f"checkpoint.interval={args.max_steps}", "eval.batches=0"]
    cfg = load_config(str(CONFIG), overrides, world_size=2)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(os.path.join(work, "train.log"), "w") as log:
        cli = [sys.executable, "-m", "megalm.cli"]
        proc = subprocess.Popen([*cli, "launch", "--nproc", "2", "--", *cli, "train", str(CONFIG), *overrides,
                                 "--resume", "none"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            out, _ = proc.communicate(timeout=args.budget_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it: checkpoint after this step, exit
            out, _ = proc.communicate()
    train_s = time.perf_counter() - t0
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        sys.exit(f"megalm train failed ({proc.returncode}):\n{open(os.path.join(work, 'train.log')).read()[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    steps = summary["step"]

    model, objective = from_checkpoint(os.path.join(work, "runs/digits/checkpoints"))
    params = sum(p.numel() for p in model.parameters())
    by_scale, best = {}, None
    t0 = time.perf_counter()
    for w in args.guidance:
        imgs = generate(model, objective, m.num_classes, args.per_class, steps=args.sampler_steps, guidance=w, seed=1)
        want = torch.arange(m.num_classes).repeat_interleave(args.per_class)
        by_scale[str(w)] = {"accuracy": accuracy(clf, imgs, want),
                            "frechet_distance": frechet_distance(features(clf, imgs), real_valid)}
        if best is None or by_scale[str(w)]["accuracy"] > by_scale[best]["accuracy"]:
            best = str(w)
        if args.grid and str(w) == best:
            from megalm.diffusion.images import grid, write_png

            write_png(args.grid, grid(imgs.view(m.num_classes, args.per_class, *imgs.shape[1:])[:, :10].reshape(
                -1, *imgs.shape[1:]), rows=m.num_classes, scale=8))
    sample_s = time.perf_counter() - t0
    no_guidance = by_scale.get("1.0", {}).get("accuracy")
    result = {
        "benchmark": "diffusion_quality", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "data": {"train_images": len(train_y), "valid_images": len(valid_y)},
        "classifier": {"valid_accuracy": clf_acc, "train_s": round(clf_s, 1)},
        "dit": {"params": params, "preset": cfg.model.get("preset"), "objective": cfg.diffusion.objective,
                "steps": steps, "global_batch": cfg.batch.global_batch, "ranks": 2, "zero_stage": cfg.parallel.zero_stage, "lr": cfg.optimizer.lr, "schedule": "constant",
                "train_wall_s": round(train_s, 1), "budget_s": args.budget_s, "last_loss": summary["last_loss"]},
        "sampling": {"sampler": "heun", "steps": args.sampler_steps, "per_class": args.per_class,
                     "wall_s": round(sample_s, 1)},
        "by_guidance": by_scale,
        "frechet_distance_real_train_vs_valid": fd_real,
        "best_guidance": float(best), "best_accuracy": by_scale[best]["accuracy"],
        "accuracy_vs_no_guidance_ratio": by_scale[best]["accuracy"] / no_guidance if no_guidance else None,
        "goal": ">= 0.95 of samples classified as the class asked for, with guidance > 1 better than 1",
        "goal_met": by_scale[best]["accuracy"] >= 0.95 and float(best) > 1.0,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from megalm.fsio import atomic_write

        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        atomic_write(args.out, text + "\n")


if __name__ == "__main__":
    main()
