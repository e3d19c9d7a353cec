"""Diffusion training on the shared Trainer with real gloo ranks: ZeRO 0-3 on 2 ranks resume
bit-exactly (weights, EMA, losses), a 2-rank checkpoint resumes on 1 rank, and `megalm sample`
writes a grid from the result."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.distributed.helper import REPO, cpu_env, run_distributed

pytestmark = pytest.mark.timeout(900)



def test_zero_stages_resume_bit_exactly_on_2_ranks(tmp_path, digits):
    modes = ["zero0", "zero1", "zero2", "zero3"]
    results = run_distributed("tests.diffusion.jobs:zero_modes", {"workdir": str(tmp_path), "shards": digits,
                                                                   "modes": modes}, nproc=2)
    for mode in modes:
        straight, split = results[0][mode]["straight"], results[0][mode]["second"]
        assert straight["step"] == split["step"] == 6, mode
        assert straight["weights_sha256"] == split["weights_sha256"], mode
        assert straight["ema_sum"] == split["ema_sum"] and straight["ema_updates"] == split["ema_updates"] == 6
        assert straight["losses"] == split["losses"], mode
        assert math.isfinite(straight["eval_loss"])
        # both ranks agree on the weights
        assert results[1][mode]["straight"]["weights_sha256"] == straight["weights_sha256"]
    # ZeRO only changes where state lives: the stages train the same model (up to float order).
    ref = results[0]["zero0"]["straight"]["losses"]
    for mode in modes[1:]:
        assert results[0][mode]["straight"]["losses"] == pytest.approx(ref, rel=1e-4), mode


def test_two_rank_checkpoint_resumes_on_one_rank_and_samples(tmp_path, digits):
    kw = {"workdir": str(tmp_path), "shards": digits}
    first = run_distributed("tests.diffusion.jobs:world_change", {**kw, "phase": "first"}, nproc=2)[0]
    assert first["step"] == 3
    rest = run_distributed("tests.diffusion.jobs:world_change", {**kw, "phase": "rest"}, nproc=1)[0]
    straight = run_distributed("tests.diffusion.jobs:world_change", {**kw, "phase": "straight"}, nproc=1)[0]
    assert rest["step"] == straight["step"] == 6 and rest["ema_updates"] == 6
    # Same samples, same noise on any DP size: the 2->1 run follows the 1-rank run (float order aside).
    # (metrics.jsonl of the resumed run holds the 2-rank steps 1-3, then the 1-rank steps 4-6)
    assert rest["losses"] == pytest.approx(straight["losses"], rel=1e-4)
    assert rest["ema_sum"] == pytest.approx(straight["ema_sum"], rel=1e-4)

    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "sample", str(tmp_path / "runs/world/checkpoints"),
                           "--class", "3", "--guidance", "4", "--steps", "4", "-n", "3", "--out", str(out)],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes().startswith(b"\x89PNG") and "1 x 3 samples" in proc.stdout
