"""megalm submit: the rendered sbatch script, the template shipped as package data, and one-line
errors for bad input (no Slurm, unknown partition, a config that does not fit the world, bad time)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from megalm.train.submit import parse_time
from tests.distributed.helper import REPO, cpu_env

CONFIG = "name: sub\nmodel: tiny\ndata: {paths: [/data/x]}\ntrain: {steps: 10}\nbatch: {micro_batch: 2, global_batch: 16}\n"


def _submit(tmp_path, *args, env=None):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    return subprocess.run([sys.executable, "-m", "megalm.cli", "submit", str(cfg), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env or cpu_env(), timeout=120)


def test_dry_run_script(tmp_path):
    r = _submit(tmp_path, "batch.micro_batch=1", "--nodes", "2", "--gpus-per-node", "8", "--time", "4:00:00",
                "--partition", "gpu", "--dry-run")
    assert r.returncode == 0, r.stderr
    s = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=4:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@300", "#SBATCH --job-name=megalm-run",
                 "export MEGALM_COLLECTIVE_TIMEOUT=600",
                 f"#SBATCH --output={tmp_path}/slurm-logs/%x-%j.out", "srun --kill-on-bad-exit=1",
                 f"-m megalm.cli train {tmp_path}/run.yaml batch.micro_batch=1 --resume auto",
                 'scontrol requeue "$SLURM_JOB_ID"',
                 f'export MEGALM_STOP_FILE="{tmp_path}/slurm-logs/.megalm-run-$SLURM_JOB_ID.stopped"',
                 'if [ -f "$MEGALM_STOP_FILE" ]; then'):
        assert line in s, line
    assert "{{" not in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0  # valid shell
    cpu = _submit(tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--time", "30", "--dry-run").stdout
    assert "#SBATCH --ntasks-per-node=1" in cpu and "--gpus-per-node" not in cpu
    assert "#SBATCH --signal=USR1@180" in cpu and "--partition" not in cpu


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-0", 86400),
                                           ("1-2:30", 95400), ("0-0:0:45", 45)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--gpus-per-node", "3", "--time", "1:00:00", "--dry-run"],
     "run.yaml: batch.global_batch: must be a multiple of micro_batch × data-parallel size (2 × 6), got 16"),
    (["--nodes", "0", "--gpus-per-node", "1", "--time", "10", "--dry-run"], "--nodes: expected >= 1, got 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "1:2:3:4", "--dry-run"], "--time: expected minutes"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "0", "--dry-run"], "--time: expected a positive time limit"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "10", "--signal-lead", "900", "--dry-run"],
     "--signal-lead: expected 0 (auto) or fewer seconds than --time (600 s), got 900"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "10", "--job-name", "a b", "--dry-run"], "--job-name"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    r = _submit(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_missing_config_and_missing_slurm(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megalm.cli", "submit", "nope.yaml", "--nodes", "1",
                        "--gpus-per-node", "1", "--time", "10"], capture_output=True, text=True, cwd=tmp_path,
                       env=cpu_env(), timeout=120)
    assert r.returncode == 2 and r.stderr == "error: nope.yaml: config file not found\n"
    # A PATH without Slurm's tools: one line saying so and how to get a cluster to try.
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    r = _submit(tmp_path, "--nodes", "1", "--gpus-per-node", "1", "--time", "10", env=cpu_env() | {"PATH": str(bare)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: submit: `sbatch` not found: Slurm is not installed here")
    assert not (tmp_path / "slurm-logs").exists()


def test_unknown_partition_on_a_real_cluster(tmp_path, slurm_cluster):
    r = _submit(tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--time", "10", "--partition", "gpu-h100",
                env=cpu_env() | {"SLURM_CONF": slurm_cluster.conf})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == "error: --partition: unknown partition 'gpu-h100'; this cluster has: debug\n"


def test_template_ships_in_the_wheel(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("megalm-*.whl")
    assert "launcher/templates/sbatch.sh" in zipfile.ZipFile(wheel).namelist()


def test_stop_file_is_written_by_rank0_only_when_asked(tmp_path, monkeypatch):
    from launcher.stopfile import ENV, note_checkpointed_stop

    path = tmp_path / ".job-7.stopped"
    monkeypatch.delenv(ENV, raising=False)
    note_checkpointed_stop(0, 10, 3)  # not under the sbatch template: nothing to write
    monkeypatch.setenv(ENV, str(path))
    note_checkpointed_stop(1, 10, 3)
    assert not path.exists()
    note_checkpointed_stop(0, 10, 3)
    assert path.read_text() == '{"signal": 10, "step": 3}\n'
