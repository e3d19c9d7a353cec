#!/usr/bin/env python
"""SIGKILL a real DeepSpeed training process at random moments while it saves checkpoints, then
check that no corrupt checkpoint is loadable and that the next run resumes from the last good one.

  python scripts/stress_checkpoint.py --trials 50 [--workdir DIR] [--seed 0]

The trials form a chain in one checkpoint directory: each trial starts the toy trainer
(tests/train/test_checkpoint_toy.py; 1 rank, DeepSpeed on CPU, a ~3.5M-parameter model saved every
step with its Adam state, so saves dominate the wall time) with resume, waits until it has
published two checkpoints past where it resumed, sleeps a random 0..1.5 s and SIGKILLs it. Then:
  - every directory under a final name (step_N) must pass full verification (marker, manifest,
    sizes, sha256): a failure there is a corrupt checkpoint a loader could pick up;
  - the next trial (and a last run without a kill) must print that it resumed from the newest
    valid checkpoint, and every loss any run printed must equal, bit for bit, the loss of an
    uninterrupted reference run at that step.
Trials alternate sync and async saving. Prints JSON counts; exit status 1 if any check failed.
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

HORIZON = 120  # steps of the reference run; the chain restarts from scratch before reaching it
MODEL = {"hidden": 768, "layers": 6, "zero": 1, "keep_last": 2, "light": True}


def reference_losses(workdir: str, horizon: int = HORIZON) -> dict[str, str]:
    """Losses of an uninterrupted run without saves (saving must not change the numbers)."""
    args = defaults(**MODEL, steps=horizon, dir=os.path.join(workdir, "ref"), out=os.path.join(workdir, "ref"))
    recs, _ = run_toy(args, timeout=1200)
    return recs[0]["losses"]


def _latest_step(ckdir: str) -> int:
    try:
        with open(os.path.join(ckdir, "latest")) as f:
            return int(f.read().strip().split("_")[1])
    except (OSError, ValueError, IndexError):
        return -1


def _parse_log(path: str) -> tuple[str | None, dict[str, str], bool]:
    """(RESUMED value, {step: loss hex}, killed while a save was in progress)."""
    resumed, losses, last_save = None, {}, None
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "RESUMED" and len(parts) == 2:
                resumed = parts[1]
            elif parts[0] == "LOSS" and len(parts) == 3:
                losses[parts[1]] = parts[2]
            elif parts[0] in ("SAVE_BEGIN", "SAVE_RETURNED"):
                last_save = parts[0]
    return resumed, losses, last_save == "SAVE_BEGIN"


def _check_dir(ckdir: str) -> tuple[list[str], list[str]]:
    valid, corrupt = [], []
    for tag in published_tags(ckdir):
        try:
            verify_directory(os.path.join(ckdir, tag))
            valid.append(tag)
        except ValueError as exc:
            corrupt.append(f"{tag}: {exc}")
    return valid, corrupt


def chain(workdir: str, trials: int, rng: random.Random, reference: dict[str, str], progress=None,
          horizon: int = HORIZON) -> list[dict]:
    """Run `trials` kill trials plus a final unkilled resume; one record per run."""
    ckdir = os.path.join(workdir, "chain")
    shutil.rmtree(ckdir, ignore_errors=True)
    expect = "none"  # what the next run must report as its resume point
    records = []
    for t in range(trials + 1):
        final = t == trials
        start = 0 if expect == "none" else int(expect)
        # The final run saves too: when the chain was just restarted from scratch it must still
        # publish something for the check below to verify.
        args = defaults(**MODEL, steps=start + 2 if final else horizon, save_every=True, resume=True,
                        dir=ckdir, out=os.path.join(workdir, f"run{t}"), **{"async": t % 2 == 1})
        log_path = os.path.join(workdir, f"run{t}.log")
        rec = {"trial": t, "final_check": final, "async": t % 2 == 1, "expected_resume": expect, "killed": False}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(toy_cmd(args, 1), env=toy_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            if final:
                proc.wait(timeout=600)
            else:
                deadline = time.time() + 600
                while _latest_step(ckdir) < start + 2:
                    if proc.poll() is not None or time.time() > deadline:
                        proc.kill()
                        proc.wait()
                        raise RuntimeError(f"trainer exited or hung before publishing; see {log_path}")
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.5))
                rec["killed"] = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        resumed, losses, mid_save = _parse_log(log_path)
        valid, corrupt = _check_dir(ckdir)
        rec.update(resumed=resumed, steps_run=len(losses), killed_mid_save=mid_save and rec["killed"],
                   tmp_leftovers=sum(n.startswith(".tmp-") for n in os.listdir(ckdir)),
                   valid=valid, corrupt_published=corrupt,
                   losses_match=bool(losses) and all(reference.get(s) == v for s, v in losses.items()))
        rec["ok"] = resumed == expect and rec["losses_match"] and not corrupt and bool(valid)
        records.append(rec)
        if progress:
            progress.update()
        if not valid:
            break
        expect = valid[-1].split("_")[1].lstrip("0") or "0"
        if int(expect) > horizon - 20:  # keep the chain inside the reference's horizon
            shutil.rmtree(ckdir, ignore_errors=True)
            expect = "none"
    return records


def summarize(records: list[dict]) -> dict:
    kills = [r for r in records if not r["final_check"]]
    return {
        "trials": len(kills),
        "killed": sum(r["killed"] for r in kills),
        "killed_mid_save_sync": sum(r["killed_mid_save"] for r in kills if not r["async"]),
        "async_trials": sum(r["async"] for r in kills),
        "tmp_leftovers_after_kill": sum(r["tmp_leftovers"] > 0 for r in kills),
        "corrupt_published": sum(bool(r["corrupt_published"]) for r in records),
        "resumed_from_newest_valid": sum(r["resumed"] == r["expected_resume"] for r in records[1:]),
        "resume_checks": len(records) - 1,
        "losses_bit_identical_to_reference": sum(r["losses_match"] for r in records),
        "runs": len(records),
        "ok": all(r["ok"] for r in records) and len(records) == len(kills) + 1,
        "failures": [r for r in records if not r["ok"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = p.parse_args(argv)
    from tqdm import tqdm

    workdir = args.workdir or tempfile.mkdtemp(prefix="megalm-stress-")
    os.makedirs(workdir, exist_ok=True)
    reference = reference_losses(workdir)
    with tqdm(total=args.trials + 1, desc="kill trials") as bar:
        records = chain(workdir, args.trials, random.Random(args.seed), reference, bar)
    summary = summarize(records)
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
