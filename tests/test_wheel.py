"""A wheel works like the checkout: build it, install it (no dependencies, no index) into a fresh
venv that sees this environment's packages, and train from another directory with a model preset
and a shipped example config, importing megalm from the wheel, not from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.distributed.corpus import make_corpus

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_trains_with_a_preset_from_another_directory(tmp_path):
    # Built from a copy: a build in the checkout would leave build/ there, whose stale files a
    # later build could pick up.
    src = tmp_path / "src"
    top_level_junk = {".git", "runs", "data", "build", "megalm.egg-info", ".pytest_cache"}
    shutil.copytree(REPO, src, symlinks=True, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or n.startswith(".venv") or (Path(d) == REPO and n in top_level_junk)])
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=tmp_path)
    (wheel,) = dist.glob("megalm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"megalm/configs/models/tiny.yaml", "megalm/configs/demo.yaml", "megalm/ops/csrc/rms_norm.cu",
            "megalm/configs/models/dit/presets.yaml", "megalm/configs/diffusion-digits.yaml"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # This environment's packages (torch, deepspeed, ...) as a plain path: its .pth files (the
    # editable megalm among them) are not processed, so megalm can only come from the wheel.
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
          "--no-index", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    where = _run([str(venv / "bin" / "python"), "-c", "import megalm; print(megalm.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))

    shards = make_corpus(str(tmp_path / "corpus"))
    (elsewhere / "mine.yaml").write_text("name: mine\nmodel: tiny\nprecision: {dtype: fp32}\n")
    small = [f"data.paths=[{shards}]", "data.seq_len=32", "batch.micro_batch=2", "batch.global_batch=2",
             "train.steps=2", "eval.batches=0", "logging.progress=false", "parallel.zero_stage=0"]
    for config in ("mine.yaml", "demo"):  # own file with a preset; the shipped example by name
        out = _run([str(venv / "bin" / "megalm"), "train", config, *small], cwd=elsewhere, env=env)
        assert '"finished": true' in out.stdout
    assert (elsewhere / "runs" / "mine" / "summary.json").exists()
    assert (elsewhere / "runs" / "demo" / "summary.json").exists()
