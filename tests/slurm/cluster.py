"""The local Slurm cluster (slurm/local/) for tests and the stress script: start/stop it, submit
the tiny training job through `megalm.train.submit.submit`, and follow jobs through `scontrol`.

Waiting is always for an observable event (a marker file, a job state), polled with a deadline
that only bounds a hang; nothing sleeps to let a race settle.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megalm.train.submit import SubmitSpec, log_path, submit
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

LOCAL = REPO / "slurm" / "local"
INSTALL_HINT = "install Slurm with slurm/local/install.sh (apt-get install slurm-wlm munge)"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")


def slurm_installed() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch"))


def cluster_dir() -> Path:
    return Path(os.environ.get("MEGALM_SLURM_DIR") or f"/tmp/megalm-slurm-{os.getuid()}")


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@dataclass
class Cluster:
    dir: Path
    conf: str
    started_here: bool

    @classmethod
    def start(cls) -> "Cluster":
        d = cluster_dir()
        running = _alive(d / "slurmctld.pid")
        proc = subprocess.run(["bash", str(LOCAL / "start.sh"), str(d)], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"slurm/local/start.sh failed: {proc.stderr[-2000:]}")
        os.environ["SLURM_CONF"] = str(d / "slurm.conf")
        return cls(d, str(d / "slurm.conf"), not running)

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(LOCAL / "stop.sh"), str(self.dir)], timeout=120)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(check: Callable[[], object], what: str, timeout: float, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else "(no log)"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n--- job log tail ---\n{tail}")
        time.sleep(0.1)


def nodes_completing() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=60).stdout
    return any("completing" in state or state.endswith("*") for state in out.split()) or not out.strip()


def wait_final(job_id: str, log: Path, timeout: float = 600) -> dict[str, str]:
    return wait_until(lambda: (lambda i: i if i.get("JobState") in FINAL else None)(job_info(job_id)),
                      f"job {job_id} to end", timeout, log)


@dataclass
class TrainJob:
    job_id: str
    log: Path
    markers: Path
    run_dir: Path


def submit_training(workdir: Path, name: str, steps: int = 6, hooks: dict[str, str] | None = None,
                    collective_timeout_s: int = 120, via_cli: bool = False) -> TrainJob:
    """The small 2-layer model, ZeRO-2, 2 nodes x 1 CPU task (gloo). `via_cli`: the real
    `megalm submit` command and plain `megalm train` in the tasks; else the library path with
    the hooked entry point (tests/slurm/hooked_train.py)."""
    shards = make_corpus(str(workdir / "shards"))
    config = workdir / "slurm.yaml"
    if not config.exists():
        config.write_text("parallel: {zero_stage: 2}\n")
    markers = workdir / f"markers-{name}"
    markers.mkdir(parents=True, exist_ok=True)
    spec = SubmitSpec(str(config), nodes=2, gpus_per_node=0, time="10", job_name=name, log_dir=str(workdir / "logs"),
                      workdir=str(workdir), overrides=small_overrides(shards, name, steps=steps),
                      collective_timeout_s=collective_timeout_s, entry=[sys.executable, "-m", "tests.slurm.hooked_train"])
    env = cpu_env() | {"MEGALM_TEST_MARKERS": str(markers), **(hooks or {})}
    if via_cli:
        cmd = [sys.executable, "-m", "megalm.cli", "submit", str(config), *spec.overrides, "--nodes", "2",
               "--gpus-per-node", "0", "--time", spec.time, "--job-name", name, "--log-dir", spec.log_dir,
               "--collective-timeout", str(collective_timeout_s)]
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise AssertionError(f"megalm submit failed: {proc.stderr}")
        job_id = proc.stdout.strip()
        return TrainJob(job_id, log_path(spec, job_id), markers, workdir / "runs" / name)
    job_id, _ = submit(spec, env=env)
    return TrainJob(job_id, log_path(spec, job_id), markers, workdir / "runs" / name)


def preempt_and_resume(job: TrainJob, pause_at: int) -> dict[str, str]:
    """The job's ranks wait at step `pause_at` (hook); USR1 them via scancel, follow the requeue,
    release the requeued job at once, and return its final scontrol record."""
    for rank in (0, 1):
        wait_until(lambda r=rank: (job.markers / f"paused.rank{r}").exists(), f"rank {rank} at step {pause_at}",
                   300, job.log)
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True, timeout=60)
    # Requeued: pending again with Restarts=1; a requeued job waits for a begin time unless released.
    wait_until(lambda: (lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING")(job_info(job.job_id))
               or job_info(job.job_id).get("JobState") in FINAL, f"job {job.job_id} to be requeued", 300, job.log)
    # Slurm holds a requeued job ~2 minutes; release it sooner, but only once the nodes finished
    # cleaning up the first run, and in a later second: slurmd refuses a credential for this job
    # id created no later than the second in which it revoked the old one.
    wait_until(lambda: not nodes_completing(), "the nodes to finish the first run", 300, job.log)
    subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now+2"], check=True, timeout=60)
    return wait_final(job.job_id, job.log)
