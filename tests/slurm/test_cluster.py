"""Real jobs on the local 2-node Slurm cluster: (a) a 2-node job (one CPU task per node, gloo)
trains the small model; (b) USR1 mid-run -> checkpoint -> requeue -> resume -> final weights
identical to the uninterrupted run, three times; (c) a killed rank fails the job fast; (d) a
stuck rank: USR2 dumps every rank's stack, the log names the rank that never reached the
collective, and the job fails at the collective timeout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.slurm.cluster import preempt_and_resume, submit_training, wait_final, wait_until

STEPS = 6


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def baseline(slurm_cluster, slurm_workdir):
    job = submit_training(slurm_workdir, "straight", steps=STEPS, via_cli=True)  # plain megalm submit + train
    info = wait_final(job.job_id, job.log)
    return job, info


def test_two_node_job_trains(baseline):
    job, info = baseline
    log = job.log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]"
    s = _summary(job.run_dir)
    assert s["finished"] and s["step"] == STEPS and s["world_size"] == 2 and s["stopped_by_signal"] == 0
    assert "requeueing" not in log and "training exited with status 0" in log
    (script,) = job.log.parent.glob("straight-*.sbatch")  # what `megalm submit` rendered and queued
    assert "-m megalm.cli train" in script.read_text() and "hooked_train" not in script.read_text()


def test_preempt_checkpoint_requeue_resume(baseline, slurm_workdir):
    # Once here: the pause hook makes the signal's step deterministic, so repeats add time, not
    # coverage; scripts/stress_preempt.py runs the 10-trial stress on demand.
    job = submit_training(slurm_workdir, "preempt", steps=STEPS, hooks={"MEGALM_TEST_PAUSE_AT": "3"})
    info = preempt_and_resume(job, pause_at=3)
    log = job.log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    # Requeued on rank 0's stop file, whatever status srun reports (143 when --kill-on-bad-exit
    # reached a rank that had passed the final barrier before it exited by itself).
    # The signal reaches the ranks while they wait after step 3; it rides in the next step's one
    # reduction, so step 4 completes on every rank and is the checkpoint.
    assert re.search(r'training stopped on a signal \(exit \d+\) after checkpointing \(\{"signal": 10, "step": 4\}\); '
                     r"requeueing", log), log[-3000:]
    assert "warning: signal 10: checkpointing at step 4 and stopping" in log
    assert "resumed from step 4" in log
    assert (job.run_dir / "checkpoints/step_00000004/COMPLETE").exists()
    s = _summary(job.run_dir)
    assert s["finished"] and s["step"] == STEPS
    assert s["weights_sha256"] == _summary(baseline[0].run_dir)["weights_sha256"]


def test_killed_rank_fails_the_job_fast(baseline, slurm_workdir):
    job = submit_training(slurm_workdir, "killed", steps=1000, hooks={"MEGALM_TEST_DIE_AT": "1:3"})
    wait_until(lambda: (job.markers / "dying.rank1").exists(), "rank 1 to kill itself", 300, job.log)
    t0 = time.monotonic()
    info = wait_final(job.job_id, job.log, timeout=120)
    elapsed = time.monotonic() - t0
    log = job.log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert elapsed < 60, elapsed  # srun --kill-on-bad-exit, not the collective timeout (120 s here)
    assert "requeueing" not in log
    rank0 = int((job.markers / "pid.rank0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(rank0, 0)


def test_stuck_rank_is_named_and_stacks_are_dumped(baseline, slurm_workdir):
    job = submit_training(slurm_workdir, "stuck", steps=1000, hooks={"MEGALM_TEST_SLEEP_AT": "1:3:900"},
                          collective_timeout_s=30)
    wait_until(lambda: (job.markers / "sleeping.rank1").exists(), "rank 1 to get stuck", 300, job.log)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=60)
    info = wait_final(job.job_id, job.log, timeout=240)  # 30 s collective timeout, not 900 s of sleep
    log = job.log.read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert "megalm: hang: rank 0 has waited" in log and "collective of step 4; rank(s) 1 never reached it" in log
    assert "megalm: hang: rank 0 gives up after" in log  # the watch ends the job at the timeout
    # Rank 1's stack (from USR2 and from the hang report) shows where it is stuck (after step 3, in
    # the test hook); rank 0 waits in an all_reduce of step 4 (ZeRO's gradient reduction).
    rank1 = "\n".join(line for line in log.splitlines() if line.startswith("1: "))
    rank0 = "\n".join(line for line in log.splitlines() if line.startswith("0: "))
    assert rank1.count("most recent call first") >= 2 and "hooked_train.py" in rank1, log[-4000:]
    assert "megalm: hang reported" in rank1
    assert rank0.count("most recent call first") >= 2 and "in all_reduce" in rank0, log[-4000:]
