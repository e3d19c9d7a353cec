"""Real process restarts across a data-parallel size change: 2 ranks -> 1 rank -> 2 ranks (ZeRO-2).

The first run is stopped like a preempted job (SIGTERM to `megalm launch`): it checkpoints at
the end of the current step and exits 128+15.
The DeepSpeed universal-checkpoint conversion happens inside `megalm train --resume auto`; the
loader continues from the global sample position (every sample of every step exactly once), and
the losses follow the single-process reference as if the run had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from megalm.train.config import load_config
from megalm.train.task import LMTask
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import cpu_env
from tests.distributed.jobs import small_overrides
from tests.distributed.reference import reference_run

pytestmark = pytest.mark.timeout(900)


def _train(tmp_path, overrides: list[str], nproc: int) -> subprocess.CompletedProcess:
    train = [sys.executable, "-m", "megalm.cli", "train", str(tmp_path / "run.yaml"), *overrides]
    cmd = [sys.executable, "-m", "megalm.cli", "launch", "--nproc", "2", "--", *train] if nproc > 1 else train
    proc = subprocess.run(cmd, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_until_sigterm(tmp_path, overrides: list[str]) -> int:
    """2 ranks; SIGTERM the launcher once the first step is logged. Returns the step it stopped at."""
    cmd = [sys.executable, "-m", "megalm.cli", "launch", "--nproc", "2", "--", sys.executable, "-m", "megalm.cli",
           "train", str(tmp_path / "run.yaml"), *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "runs/world/metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()  # never wait on a run that may still be going
            pytest.fail(f"no step logged (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "checkpointing at step" in err
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (tmp_path / f"runs/world/checkpoints/step_{step:08d}/COMPLETE").exists()
    return step


def test_resume_2_to_1_to_2_ranks(tmp_path):
    shards = make_corpus(str(tmp_path / "shards"))
    (tmp_path / "run.yaml").write_text("name: world\nparallel: {zero_stage: 2}\n")
    trace = tmp_path / "trace"
    overrides = small_overrides(shards, "world", steps=8)[1:] + [f"debug.trace_batches={trace}"]
    stopped = _train_until_sigterm(tmp_path, overrides)
    assert 1 <= stopped < 7
    _train(tmp_path, overrides + ["debug.max_steps_this_run=1"], nproc=1)  # --resume auto (default)
    ckpt = tmp_path / f"runs/world/checkpoints/step_{stopped + 1:08d}"
    proc = _train(tmp_path, overrides + ["--resume", str(ckpt)], nproc=2)
    assert f"resumed from step {stopped + 1}" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["step"] == 8 and summary["world_size"] == 2

    # Which samples each step used, across all ranks, vs. the loader's global order.
    seen: dict[int, Counter] = {}
    for path in trace.glob("rank*.jsonl"):
        for rec in map(json.loads, path.read_text().splitlines()):
            seen.setdefault(rec["data_step"], Counter()).update(rec["samples"])
    cfg = load_config(None, small_overrides(shards, "x", steps=8) + ["parallel.zero_stage=2"], world_size=1)
    loader = LMTask(cfg).build_loader("train", 0, 1)
    for step in range(1, 9):
        expected = Counter(hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16]
                           for mb in next(loader) for row in mb["input_ids"])
        assert seen[step] == expected, f"data step {step}"
    assert sorted(seen) == list(range(1, 9))

    records = [r for r in map(json.loads, (tmp_path / "runs/world/metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    ref, _ = reference_run(small_overrides(shards, "ref", steps=8))
    got = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in got)
    assert got == pytest.approx(ref, abs=1e-5, rel=0)
    # The same scalars went to TensorBoard (one event file per process that ran as rank 0).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for events in (tmp_path / "runs/world/tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        assert {"train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "train/loss_scale",
                "train/tokens_per_s"} <= set(acc.Tags()["scalars"])
        steps |= {e.step for e in acc.Scalars("train/loss")}
    assert steps == set(range(1, 9))
