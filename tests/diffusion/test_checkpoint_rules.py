"""A diffusion run's checkpoints follow the LM's rules through `megalm train` itself (one rank):
the run lock, the resume checks (model shape, data seed), and the reader's unpickle allowlist
when `megalm sample` opens a DiT checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megalm.checkpoint.files import complete_directory
from megalm.checkpoint.layout import published_tags
from megalm.checkpoint.lock import RunLock
from tests.checkpoint.test_train_cli import _RunsCode, one_error_line
from tests.diffusion.jobs import overrides
from tests.distributed.helper import REPO, cpu_env

pytestmark = pytest.mark.timeout(900)
CONFIG = os.path.join(REPO, "configs", "diffusion-digits.yaml")


def megalm(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalm.cli", *args], cwd=cwd, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)


def train(digits: str, cwd, name: str, *extra: str) -> subprocess.CompletedProcess:
    return megalm(["train", CONFIG, *overrides(digits, name, steps=1), "parallel.zero_stage=0",
                   "diffusion.grid_interval=0", *extra], cwd)


def test_lock_and_resume_rules_apply_to_diffusion_runs(digits, tmp_path):
    ck = tmp_path / "runs" / "dit" / "checkpoints"
    ck.mkdir(parents=True)
    holder = RunLock(str(ck / ".lock"))
    holder.acquire()  # another trainer of this run is alive (this process): deterministic
    try:
        line = one_error_line(train(digits, tmp_path, "dit"))
    finally:
        holder.release()
    assert f"pid {os.getpid()}," in line and "another trainer" in line, line
    assert not published_tags(str(ck))

    first = train(digits, tmp_path, "dit")
    assert first.returncode == 0, first.stderr[-3000:]
    assert published_tags(str(ck)) == ["step_00000001"]
    line = one_error_line(train(digits, tmp_path, "dit", "model.dim=48", "train.steps=2"))
    assert "a checkpoint of another model (model.dim is 32 there, 48 here" in line, line
    line = one_error_line(train(digits, tmp_path, "dit", "data.seed=99", "train.steps=2"))
    assert "data.seed: the checkpoint was made with seed 1234, the config says 99" in line, line
    assert published_tags(str(ck)) == ["step_00000001"]


def test_sample_refuses_a_planted_pickle_in_a_dit_checkpoint(digits, tmp_path):
    assert train(digits, tmp_path, "dit").returncode == 0
    good = tmp_path / "runs" / "dit" / "checkpoints" / "step_00000001"
    # Options before and after the checkpoint (any order, as for every verb).
    ok = megalm(["sample", "--steps", "2", str(good), "-n", "1", "--out", str(tmp_path / "g.png")], tmp_path)
    assert ok.returncode == 0 and "10 x 1 samples" in ok.stdout, ok.stderr[-2000:]

    evil = tmp_path / "evil" / "step_00000001"
    shutil.copytree(good, evil)
    marker = tmp_path / "code-ran"
    torch.save({"client": _RunsCode(str(marker))}, evil / "mp_rank_00_model_states.pt")
    (evil / "manifest.json").unlink()
    (evil / "COMPLETE").unlink()
    complete_directory(str(evil), [], {"step": 1})
    line = one_error_line(megalm(["sample", str(evil), "--out", str(tmp_path / "e.png")], tmp_path))
    assert "mp_rank_00_model_states.pt" in line, line
    assert not marker.exists() and not (tmp_path / "e.png").exists()


def test_resume_check_reads_a_dit_saved_before_freq_shift_as_trained():
    """Checkpoints from before `freq_shift` existed were trained with 0: resuming them with the new
    default (1) is refused naming the field, and `model.freq_shift: 0` resumes them."""
    from types import SimpleNamespace

    from megalm.train.diffusion import DiffusionTask
    from megalm.errors import UserError
    from megalm.models.dit import DiTConfig
    from megalm.train.loop import Trainer

    def check(ours: DiTConfig, saved: dict) -> None:
        task = SimpleNamespace(fingerprint=lambda: {"model_config": ours.to_dict()},
                               saved_model_config=lambda s: DiffusionTask.saved_model_config(None, s))
        Trainer._same_model(SimpleNamespace(task=task), {"data": {"model_config": saved}})

    old = {k: v for k, v in DiTConfig.from_dict({"preset": "dit-tiny", "freq_shift": 0}).to_dict().items()
           if k != "freq_shift"}
    with pytest.raises(UserError, match="model.freq_shift is 0 there, 1 here"):
        check(DiTConfig.from_dict({"preset": "dit-tiny"}), old)
    check(DiTConfig.from_dict({"preset": "dit-tiny", "freq_shift": 0}), old)
