#!/usr/bin/env python
"""SIGKILL a whole 2-rank `megalm train` run (ZeRO-2, async saves) at random moments, resume it,
and check the chain of runs against one uninterrupted run of the same config.

  python scripts/stress_checkpoint.py --trials 12 [--workdir DIR] [--seed 0] [--steps 40] [--out FILE]

Data: a real sentencepiece corpus (Python's help topics, tests/distributed/corpus.py). Config:
configs/demo.yaml (the `tiny` model, ZeRO-2, fp32) with a checkpoint every 2 steps, keep_last 2,
async_save on. Each trial starts `megalm launch --nproc 2 -- megalm train ... --resume auto`,
waits until the run has published a checkpoint past where it resumed, sleeps a random time and
SIGKILLs the launcher and both ranks at once (a lost node). Then:
  - every folder under a final name (step_N) must pass full verification (marker, manifest,
    sizes, sha256): one that fails is a corrupt checkpoint a loader could pick up;
  - the next run must say it resumed from the newest valid checkpoint;
  - every loss any run logged (metrics.jsonl) must equal the reference run's loss at that step,
    bit for bit, and the last run (not killed) must end with the reference's weights sha256.
Prints JSON counts (killed, killed mid-save, temp dirs left, corrupt published, resumed ok,
identical); exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megalm.checkpoint.files import verify_directory  # noqa: E402
from megalm.checkpoint.layout import LATEST, published_tags, step_of  # noqa: E402
from megalm.fsio import atomic_write  # noqa: E402
from tests.distributed.corpus import make_corpus  # noqa: E402
from tests.distributed.helper import cpu_env  # noqa: E402

RESUMED = re.compile(r"^resumed from step (\d+) ")


def command(shards: str, name: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megalm.cli", "launch", "--nproc", "2", "--", sys.executable, "-m", "megalm.cli",
            "train", os.path.join(REPO, "configs", "demo.yaml"), f"name={name}", f"data.paths=[{shards}]",
            f"train.steps={steps}", "checkpoint.interval=2", "checkpoint.keep_last=2", "checkpoint.async_save=true",
            "logging.interval=1", "logging.progress=false", "eval.batches=0", "eval.interval=0", *extra,
            "--resume", "auto"]


def losses(run_dir: str) -> list[tuple[int, float]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
            if r.get("kind") == "train":
                out.append((r["step"], r["loss"]))
    return out


def newest_published(ckdir: str) -> int:
    try:
        with open(os.path.join(ckdir, LATEST)) as f:
            return step_of(f.read().strip())
    except (OSError, ValueError):
        return -1


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the launcher and every process under it at once; returns how many were alive."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return 0
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=30)
    return len(victims)


def check_dir(ckdir: str) -> tuple[list[str], list[str]]:
    valid, corrupt = [], []
    for tag in published_tags(ckdir):
        try:
            verify_directory(os.path.join(ckdir, tag))
            valid.append(tag)
        except ValueError as exc:
            corrupt.append(f"{tag}: {exc}")
    return valid, corrupt


def run_reference(work: str, shards: str, steps: int) -> dict:
    shutil.rmtree(os.path.join(work, "runs", "reference"), ignore_errors=True)
    log = os.path.join(work, "reference.log")
    with open(log, "w") as out:
        proc = subprocess.run(command(shards, "reference", steps), cwd=work, env=cpu_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"reference run failed; see {log}")
    summary = json.loads(open(os.path.join(work, "runs", "reference", "summary.json")).read())
    return {"losses": dict(losses(os.path.join(work, "runs", "reference"))), "weights": summary["weights_sha256"]}


def chain(work: str, shards: str, steps: int, trials: int, rng: random.Random, ref: dict) -> list[dict]:
    run_dir = os.path.join(work, "runs", "chain")
    ckdir = os.path.join(run_dir, "checkpoints")
    shutil.rmtree(run_dir, ignore_errors=True)
    records = []
    for t in range(trials + 1):
        final = t == trials
        valid_before = check_dir(ckdir)[0]
        expect = step_of(valid_before[-1]) if valid_before else None
        log = os.path.join(work, f"chain{t}.log")
        rec = {"trial": t, "final": final, "expected_resume": expect, "killed": False, "mid_save": False}
        with open(log, "w") as out:
            proc = subprocess.Popen(command(shards, "chain", steps), cwd=work, env=cpu_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
            if final:
                rec["exit"] = proc.wait(timeout=3600)
            else:
                target, deadline = (expect or 0) + 2, time.time() + 900
                while newest_published(ckdir) < target and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.05)
                if proc.poll() is None:
                    time.sleep(rng.uniform(0.0, 4.0))
                    rec["mid_save"] = any(n.startswith(".tmp-step_") for n in os.listdir(ckdir))
                    rec["killed"] = kill_tree(proc) > 0
                else:
                    proc.wait()
                rec["exit"] = proc.returncode
        text = open(log).read()
        resumed = [int(m.group(1)) for m in map(RESUMED.match, text.splitlines()) if m]
        rec["resumed"] = resumed[0] if resumed else None
        rec["resumed_ok"] = rec["resumed"] == expect
        valid, corrupt = check_dir(ckdir)
        rec["tmp_left"] = sum(n.startswith(".tmp-") for n in os.listdir(ckdir)) if os.path.isdir(ckdir) else 0
        rec["corrupt_published"] = corrupt
        seen = losses(run_dir)
        rec["losses_identical"] = bool(seen) and all(ref["losses"].get(s) == v for s, v in seen)
        if final:
            summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
            rec["weights_identical"] = summary["weights_sha256"] == ref["weights"] and summary["finished"]
        rec["ok"] = rec["resumed_ok"] and rec["losses_identical"] and not corrupt and (
            rec["killed"] or (final and rec["exit"] == 0 and rec["weights_identical"]))
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if not final and valid and step_of(valid[-1]) >= steps - 4:  # stay inside the horizon
            shutil.rmtree(run_dir)
    return records


def summarize(records: list[dict]) -> dict:
    kills = [r for r in records if not r["final"]]
    return {
        "trials": len(kills),
        "killed": sum(r["killed"] for r in kills),
        "killed_mid_save": sum(r["mid_save"] for r in kills if r["killed"]),
        "temp_dirs_left_after_kill": sum(r["tmp_left"] > 0 for r in kills),
        "corrupt_published": sum(bool(r["corrupt_published"]) for r in records),
        "resumed_ok": sum(r["resumed_ok"] for r in records),
        "runs": len(records),
        "losses_identical_runs": sum(r["losses_identical"] for r in records),
        "final_weights_identical": bool(records and records[-1].get("weights_identical")),
        "ok": all(r["ok"] for r in records),
        "failures": [r for r in records if not r["ok"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=40, help="horizon of the reference run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--out", default=None, help="also write the JSON counts there")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="megalm-stress-")
    os.makedirs(work, exist_ok=True)
    shards = make_corpus(os.path.join(work, "shards"))
    ref = run_reference(work, shards, args.steps)
    summary = summarize(chain(work, shards, args.steps, args.trials, random.Random(args.seed), ref))
    summary.update(seed=args.seed, steps=args.steps, date=time.strftime("%Y-%m-%d"))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
