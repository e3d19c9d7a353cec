#!/usr/bin/env python
"""SIGKILL a real DeepSpeed training process at random moments while it saves checkpoints, then
check that no corrupt checkpoint is loadable and that the next run resumes from the last good one.

  python scripts/stress_checkpoint.py --trials 50 [--workdir DIR] [--seed 0]

Each trial: start the toy trainer (tests/train/test_checkpoint_toy.py; 1 rank, DS on CPU, an
~3.5M-parameter model saved every step with Adam state, so saves dominate the wall time), wait for
the first publication (`latest` exists), sleep a random 0..1.5 s and SIGKILL it. Then:
  - every directory under a final name (step_N) must pass full verification (marker, manifest,
    sizes, sha256): a failure there is a corrupt checkpoint that a loader could pick up;
  - a fresh run with resume must load the newest valid checkpoint and reproduce, bit for bit, the
    losses of an uninterrupted reference run for the next two steps.
Trials alternate sync and async saving. Prints JSON counts; exit status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "train"))
sys.path.insert(0, REPO)

from test_checkpoint_toy import defaults, run_toy, toy_cmd, toy_env  # noqa: E402

from megalm.train.checkpoint import published_tags  # noqa: E402
from megalm.train.checkpoint_files import verify_directory  # noqa: E402

STEPS = 30  # more than a trial lives: the kill comes first
MODEL = {"hidden": 768, "layers": 6, "zero": 1, "keep_last": 2, "light": True}


def reference_losses(workdir: str) -> dict[str, str]:
    """Losses of an uninterrupted run (no saves: saving must not change the numbers)."""
    args = defaults(**MODEL, steps=STEPS, dir=os.path.join(workdir, "ref"), out=os.path.join(workdir, "ref"))
    recs, _ = run_toy(args)
    return recs[0]["losses"]


def kill_trial(workdir: str, trial: int, rng: random.Random, reference: dict[str, str]) -> dict:
    """One kill + check + resume; returns a record with 'ok' and what was observed."""
    ckdir = os.path.join(workdir, f"trial{trial}")
    shutil.rmtree(ckdir, ignore_errors=True)
    async_save = trial % 2 == 1
    args = defaults(**MODEL, steps=STEPS, save_every=True, dir=ckdir, out=os.path.join(ckdir, "run"),
                    **{"async": async_save})
    log_path = os.path.join(workdir, f"trial{trial}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(toy_cmd(args, 1), env=toy_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(ckdir, "latest")):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"trainer exited or hung before its first checkpoint; see {log_path}")
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(log_path) as f:
        events = [line.split() for line in f if line.startswith("SAVE_")]
    mid_save = bool(events) and events[-1][0] == "SAVE_BEGIN"
    leftovers = [n for n in os.listdir(ckdir) if n.startswith(".tmp-")]
    corrupt, valid = [], []
    for tag in published_tags(ckdir):
        try:
            verify_directory(os.path.join(ckdir, tag))
            valid.append(tag)
        except ValueError as exc:
            corrupt.append(f"{tag}: {exc}")
    rec = {"trial": trial, "async": async_save, "killed": killed, "killed_mid_save": mid_save, "tmp_leftovers": len(leftovers),
           "valid": valid, "corrupt_published": corrupt, "ok": False}
    if corrupt or not valid:
        return rec
    newest = int(valid[-1].split("_")[1])
    check = [s for s in (newest + 1, newest + 2) if s <= STEPS]
    resume = dict(args, steps=max([newest] + check), save_every=False, resume=True, out=os.path.join(ckdir, "resume"))
    resume.pop("async")
    recs, out = run_toy(resume)
    r = recs[0]
    rec["resumed_from"] = r.get("loaded_step")
    rec["tmp_cleaned"] = not any(n.startswith(".tmp-") for n in os.listdir(ckdir))
    rec["losses_match"] = all(r["losses"][str(s)] == reference[str(s)] for s in check)
    rec["ok"] = rec["resumed_from"] == newest and rec["losses_match"] and rec["tmp_cleaned"]
    shutil.rmtree(ckdir, ignore_errors=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = p.parse_args(argv)
    from tqdm import tqdm

    workdir = args.workdir or tempfile.mkdtemp(prefix="megalm-stress-")
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(args.seed)
    reference = reference_losses(workdir)
    records = [kill_trial(workdir, t, rng, reference) for t in tqdm(range(args.trials), desc="kill trials")]
    summary = {
        "trials": len(records),
        "ok": sum(r["ok"] for r in records),
        "killed_mid_save": sum(r["killed_mid_save"] for r in records),
        "tmp_leftovers_after_kill": sum(r["tmp_leftovers"] > 0 for r in records),
        "corrupt_published": sum(bool(r["corrupt_published"]) for r in records),
        "resumed_from_newest_valid": sum(r.get("resumed_from") == int(r["valid"][-1].split("_")[1])
                                         for r in records if r["valid"]),
        "async_trials": sum(r["async"] for r in records),
        "failures": [r for r in records if not r["ok"]],
    }
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
