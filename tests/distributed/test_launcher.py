"""`megalm launch` and launcher.env: torchrun-compatible env, dead rank -> non-zero exit (no hang),
signals forwarded; rank discovery from torchrun / mpirun / srun variables."""

from __future__ import annotations


import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.env import discover, first_host
from megalm.errors import UserError
from megalm.checkpoint.files import verify_directory
from megalm.checkpoint.layout import published_tags
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

LAUNCH = [sys.executable, "-m", "megalm.cli", "launch"]

# Ranks join a gloo group and all_reduce in a loop; rank 1 dies abruptly mid-loop (no cleanup),
# leaving rank 0 blocked in a collective that can never complete.
COLLECTIVE_THEN_DIE = """
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
with open(os.path.join(os.environ["OUT"], f"env{rank}"), "w") as f:
    f.write(" ".join(os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")))
for step in range(10**6):
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1 and step == 20:
        os._exit(7)
"""


def test_env_discovery():
    tr = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.local_world_size, tr.master_addr, tr.master_port,
            tr.source) == (3, 8, 1, 2, "n1", 1234, "torchrun")
    mpi = discover({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "MASTER_ADDR": "h"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.local_world_size, mpi.source) == (5, 6, 2, 3, "mpirun")
    srun = discover({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                     "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (srun.rank, srun.world_size, srun.local_rank, srun.local_world_size, srun.master_addr,
            srun.master_port, srun.source) == (1, 4, 1, 2, "gpu07", 24242, "srun")
    assert discover({}).world_size == 1 and discover({}).source == "single"
    assert first_host("a1,b2") == "a1" and first_host("node[3,5-6]") == "node3" and first_host("x") == "x"


def test_dead_rank_stops_the_job(tmp_path):
    env = cpu_env() | {"OUT": str(tmp_path)}
    t0 = time.monotonic()
    proc = subprocess.run([*LAUNCH, "--nproc", "2", "--", sys.executable, "-c", COLLECTIVE_THEN_DIE],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "rank 1 exited with status 7" in proc.stderr
    assert time.monotonic() - t0 < 110  # generous bound: what matters is that it returned at all
    assert (tmp_path / "env0").read_text() == "0 0 2 2" and (tmp_path / "env1").read_text() == "1 1 2 2"


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids |= {int(x) for x in f.read().split()}
        except FileNotFoundError:
            pass
    return kids


def _alive_in_groups(pgids: set[int]) -> list[str]:
    """Live (non-zombie) processes whose process group is one of `pgids` (a rank and anything it forked)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] not in ("Z", "X") and int(fields[2]) in pgids:
            alive.append(f"pid {entry}: {stat[:80]}")
    return alive


def test_killed_training_rank_stops_the_job(tmp_path):
    """A real 2-rank DeepSpeed (ZeRO-2, gloo) training run; rank 1 is SIGKILLed mid-training:
    the launcher exits non-zero promptly, no rank process survives, and every published
    checkpoint verifies (a half-written save stays a .tmp- directory)."""
    shards = make_corpus(str(tmp_path / "shards"))
    megalm = os.path.join(os.path.dirname(sys.executable), "megalm")
    train = [megalm] if os.path.exists(megalm) else [sys.executable, "-m", "megalm.cli"]
    (tmp_path / "run.yaml").write_text("name: killed\nparallel: {zero_stage: 2}\n")
    overrides = small_overrides(shards, "killed", steps=100000)[1:] + [
        "checkpoint.interval=1", "checkpoint.keep_last=100"]
    cmd = [*LAUNCH, "--nproc", "2", "--", *train, "train", str(tmp_path / "run.yaml"), *overrides]
    # stderr goes to a file, not a pipe: nobody reads a pipe while we poll, and a full one would
    # block the ranks. Never communicate() with a launcher that may still be training.
    log_path = tmp_path / "launch.log"
    log = open(log_path, "w")
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=log)
    ranks: list[int] = []
    try:
        metrics = tmp_path / "runs/killed/metrics.jsonl"
        # Generous: the first DeepSpeed start on a fresh venv compiles bytecode and may JIT-build
        # DeepSpeed's CPU comm op; what this test times is the exit after the kill, not the start.
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # 2 steps done: mid-training
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training did not reach step 2 (exit {launcher.poll()}): "
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        rank1 = next(pid for pid in ranks if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
        t0 = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("launcher still running 60 s after a rank was killed (hang)")
        elapsed = time.monotonic() - t0
    finally:  # on a failed assertion above, leave nothing running
        if launcher.poll() is None:
            leftover = ranks or _children(launcher.pid)
            launcher.kill()
            launcher.wait()
            for pgid in leftover:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()
    err = log_path.read_text()
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "rank 1 exited with status -9" in err, err[-3000:]
    assert elapsed < 30, elapsed
    assert _alive_in_groups(ranks) == []  # each rank leads its own process group (start_new_session)
    ckpt = tmp_path / "runs/killed/checkpoints"
    tags = published_tags(str(ckpt))
    assert tags, "no checkpoint was published before the kill"
    for tag in tags:
        verify_directory(str(ckpt / tag))


def test_sigterm_is_forwarded(tmp_path):
    script = ("import signal, sys, time, os\n"
              "signal.signal(signal.SIGTERM, lambda *a: (open(os.environ['OUT'] + '/got' + os.environ['RANK'], 'w')"
              ".close(), sys.exit(0)))\n"
              "open(os.environ['OUT'] + '/ready' + os.environ['RANK'], 'w').close()\n"
              "time.sleep(600)\n")
    env = cpu_env() | {"OUT": str(tmp_path)}
    proc = subprocess.Popen([*LAUNCH, "--nproc", "2", "--", sys.executable, "-c", script], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert (tmp_path / "got0").exists() and (tmp_path / "got1").exists()


def test_usage_errors_are_one_line():
    proc = subprocess.run([*LAUNCH, "--nproc", "2", "true"], capture_output=True, text=True, cwd=REPO,
                          env=cpu_env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "`--`" in proc.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_success_exit_zero(nproc):
    proc = subprocess.run([*LAUNCH, "--nproc", str(nproc), "--", sys.executable, "-c", "pass"],
                          env=cpu_env(), timeout=60)
    assert proc.returncode == 0



def test_mpirun_ranks_form_a_gloo_group(tmp_path):
    """Under a real `mpiexec -n 2` the trainer's discovery yields a working process group."""
    from launcher.env import free_port

    script = ("import torch, torch.distributed as dist\n"
              "from launcher.env import discover\n"
              "env = discover(); env.export()\n"
              "dist.init_process_group('gloo')\n"
              "t = torch.tensor([float(env.rank + 1)]); dist.all_reduce(t)\n"
              "print(env.source, env.rank, env.world_size, env.local_rank, int(t.item()), flush=True)\n"
              "dist.destroy_process_group()\n")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    port = str(free_port())
    proc = subprocess.run([mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "2",
                           "-x", f"MASTER_PORT={port}", "-x", "PYTHONPATH", sys.executable, "-c", script],
                          env=cpu_env() | {"MASTER_PORT": port}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("mpirun"))
    assert lines == ["mpirun 0 2 0 3", "mpirun 1 2 1 3"]


@pytest.mark.parametrize("argv, expected", [
    (["--nproc", "2", "--", "/nonexistent/cmd"], "megalm launch: cannot run '/nonexistent/cmd': "),
    (["--nproc", "1", "--"], "megalm launch: expected a command after `--`"),
])
def test_bad_command_is_one_line(argv, expected):
    proc = subprocess.run([*LAUNCH, *argv], capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_failed_spawn_stops_ranks_already_started(monkeypatch):
    """Rank 0 starts, rank 1's spawn fails: rank 0 must not be left running."""
    from launcher import cli

    real_popen, started = subprocess.Popen, []

    def popen(cmd, **kw):
        if started:
            raise FileNotFoundError(2, "No such file or directory")
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(600)"], **kw))
        return started[-1]

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    with pytest.raises(UserError, match="cannot run 'x': No such file or directory"):
        cli.main(["--nproc", "2", "--", "x"])
    assert started[0].poll() is not None  # killed by the launcher, not orphaned


def test_single_process_gets_a_free_port_and_mpi_multinode_needs_master_addr():
    ports = {discover({}).master_port for _ in range(3)}
    assert 29500 not in ports and len(ports) > 1  # two single-process runs never share a fixed port
    assert discover({"MASTER_PORT": "1234"}).master_port == 1234
    with pytest.raises(UserError, match="MASTER_PORT: expected a port number"):
        discover({"MASTER_PORT": "x29500"})
    multi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(UserError, match="MASTER_ADDR"):
        discover(multi)
    assert discover(multi | {"MASTER_ADDR": "n0"}).master_addr == "n0"
    one_node = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover(one_node).master_addr == "127.0.0.1"
