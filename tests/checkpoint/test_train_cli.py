"""Checkpointing through `megalm train` itself (one rank unless stated): the run lock, the
one-line refusals of bad checkpoint input (a planted pickle among them), `megalm sample` on empty
folders, a full disk on a real small tmpfs (sync and async saves), and async saves on 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.files import complete_directory, verify_directory
from megalm.checkpoint.layout import published_tags
from megalm.checkpoint.lock import RunLock
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))


def megalm(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megalm.cli", *args], cwd=cwd, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def train(shards: str, cwd, name: str, *extra: str, steps: int = 2) -> subprocess.CompletedProcess:
    overrides = small_overrides(shards, name, steps=steps) + ["parallel.zero_stage=0", *extra]
    return megalm(["train", os.path.join(REPO, "configs", "demo.yaml"), *overrides], cwd)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one `error:` line (DeepSpeed's warnings may precede it)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_second_trainer_on_a_run_exits_2_naming_the_holder(shards, tmp_path):
    ck = tmp_path / "runs" / "locked" / "checkpoints"
    ck.mkdir(parents=True)
    holder = RunLock(str(ck / ".lock"))
    holder.acquire()  # a trainer of this run (this process) is alive: deterministic, no timing
    try:
        proc = train(shards, tmp_path, "locked")
    finally:
        holder.release()
    line = one_error_line(proc)
    assert f"pid {os.getpid()}," in line and "host " in line and "another trainer" in line, line
    assert not published_tags(str(ck))


def test_bad_checkpoint_inputs_are_one_line_each(shards, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    line = one_error_line(train(shards, tmp_path, "f", f"checkpoint.dir={tmp_path / 'afile'}"))
    assert "checkpoint.dir" in line and "is a file" in line, line

    missing = tmp_path / "runs" / "x" / "checkpoints" / "step_00000009"
    line = one_error_line(megalm(["train", os.path.join(REPO, "configs", "demo.yaml"),
                                  *small_overrides(shards, "m"), "--resume", str(missing)], tmp_path))
    assert f"{missing} does not exist" in line, line

    # A run of dim 32 resumed with model.dim=48: named fields and the way out, nothing loaded.
    assert train(shards, tmp_path, "shape", steps=1).returncode == 0
    line = one_error_line(train(shards, tmp_path, "shape", "model.dim=48"))
    assert "step_00000001: a checkpoint of another model (model.dim is 32 there, 48 here" in line, line
    assert "--resume none" in line and "name=" in line, line
    assert published_tags(str(tmp_path / "runs" / "shape" / "checkpoints")) == ["step_00000001"]

    # The same checkpoint with a pickle that would run code (manifest re-made to match, so only
    # the unpickle allowlist stands in the way): sample and resume refuse it in one line.
    evil = tmp_path / "evil" / "step_00000001"
    shutil.copytree(tmp_path / "runs" / "shape" / "checkpoints" / "step_00000001", evil)
    marker = tmp_path / "code-ran"
    torch.save({"client": _RunsCode(str(marker))}, evil / "mp_rank_00_model_states.pt")
    (evil / "manifest.json").unlink()
    (evil / "COMPLETE").unlink()
    complete_directory(str(evil), [], {"step": 1})
    for args in (["sample", str(evil), "--prompt", "x"],
                 ["train", os.path.join(REPO, "configs", "demo.yaml"), *small_overrides(shards, "evil"),
                  "parallel.zero_stage=0", "--resume", str(evil)]):
        line = one_error_line(megalm(args, tmp_path))
        assert f"{evil / 'mp_rank_00_model_states.pt'}: refusing to load" in line and "system" in line, line
    assert not marker.exists()

    (tmp_path / "runs" / "empty" / "checkpoints").mkdir(parents=True)
    for target in ("runs/empty/checkpoints", "runs/empty"):
        line = one_error_line(megalm(["sample", target, "--prompt", "x"], tmp_path))
        assert "holds no checkpoint yet" in line, line


def _checkpoint_bytes(ckdir: Path) -> int:
    tag = published_tags(str(ckdir))[-1]
    return sum(f["bytes"] for f in verify_directory(str(ckdir / tag))["files"])


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes; unmounted at teardown."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"vol{len(mounted)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_prunes_older_checkpoints_and_retries_then_stops_cleanly(shards, tmp_path, tmpfs, async_save):
    flag = f"checkpoint.async_save={str(async_save).lower()}"
    assert train(shards, tmp_path, "size", "checkpoint.interval=1", steps=1).returncode == 0
    size = _checkpoint_bytes(tmp_path / "runs" / "size" / "checkpoints")

    # Room for ~2.5 checkpoints, keep_last=5 (warned at start-up): step 3's save hits ENOSPC,
    # step 1 is pruned (older than the newest valid, step 2) and the save retried; the same at
    # step 4. The run finishes.
    vol = tmpfs(int(2.5 * size) + 64 * 1024)
    proc = train(shards, tmp_path, "full", flag, "checkpoint.interval=1", "checkpoint.keep_last=5",
                 f"checkpoint.dir={vol / 'ck'}", steps=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warns = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any(w.startswith(f"warning: {vol} has ") and "checkpoint.keep_last=5 needs room for 6 checkpoints" in w
               for w in warns), warns
    assert any(f"disk full on {vol} while saving checkpoint step_00000003: deleted older checkpoints step_00000001"
               in w for w in warns), warns
    assert any("while saving checkpoint step_00000004: deleted older checkpoints step_00000002" in w
               for w in warns), warns
    assert published_tags(str(vol / "ck")) == ["step_00000003", "step_00000004"]
    for tag in published_tags(str(vol / "ck")):
        verify_directory(str(vol / "ck" / tag))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["finished"] is True

    # Room for ~1.5: step 2 cannot be written beside step 1 and nothing is prunable: exit 2, one
    # line (volume, size, what to change), its temp data gone, step 1 intact and resumable.
    vol = tmpfs(int(1.5 * size) + 64 * 1024)
    proc = train(shards, tmp_path, "stop", flag, "checkpoint.interval=1", "checkpoint.keep_last=1",
                 f"checkpoint.dir={vol / 'ck'}", steps=3)
    line = one_error_line(proc)
    assert f"checkpoint step_00000002 was not saved: disk full on {vol}" in line, line
    assert "checkpoint.keep_last (now 1)" in line and "step_00000001 is intact" in line, line
    assert sorted(os.listdir(vol / "ck")) == [".lock", "latest", "step_00000001"]
    verify_directory(str(vol / "ck" / "step_00000001"))


def _launch_train(shards: str, cwd, name: str, *extra: str) -> dict:
    overrides = small_overrides(shards, name, steps=4) + ["parallel.zero_stage=2", *extra]
    proc = megalm(["launch", "--nproc", "2", "--", sys.executable, "-m", "megalm.cli", "train",
                   os.path.join(REPO, "configs", "demo.yaml"), *overrides], cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(cwd) / "runs" / name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((run / "summary.json").read_text()), "out": proc.stdout,
            "losses": {r["step"]: r["loss"] for r in records if r["kind"] == "train"}}


def test_async_save_through_megalm_train_on_two_ranks_resumes_bit_identically(shards, tmp_path):
    """ZeRO-2 on 2 ranks with checkpoint.async_save: stopped after step 2 (its async save is
    published before the process exits), resumed to step 4: the same losses and final weights as
    a straight run with synchronous saves."""
    straight = _launch_train(shards, tmp_path, "sync")
    first = _launch_train(shards, tmp_path, "async", "checkpoint.async_save=true", "debug.max_steps_this_run=2")
    assert first["summary"]["step"] == 2
    assert published_tags(str(tmp_path / "runs" / "async" / "checkpoints")) == ["step_00000002"]
    second = _launch_train(shards, tmp_path, "async", "checkpoint.async_save=true")
    assert "resumed from step 2" in second["out"]
    assert second["summary"]["finished"] and second["summary"]["weights_sha256"] == straight["summary"]["weights_sha256"]
    assert second["losses"] == straight["losses"]
    assert published_tags(str(tmp_path / "runs" / "async" / "checkpoints")) == ["step_00000002", "step_00000004"]
