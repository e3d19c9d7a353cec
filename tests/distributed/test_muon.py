"""optimizer.name=muon through the trainer on 2 real gloo ranks, ZeRO 0/1/2/3, a 2-stage pipeline
(ZeRO 1 and 0) and ZeRO-Offload (optimizer on the CPU, ZeRO 1/2/3):
- the applied update of a hidden matrix is orthogonalised (its singular values are about equal),
  while the untied head `output` and the embedding get AdamW's first step (|Δw| = lr everywhere);
- 2 steps + a new engine resuming + 2 steps == 4 straight steps, bit for bit;
- a NaN step is skipped without poisoning Muon's momentum (ZeRO 2/3 update it before the guard)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from megalm.models.load import load_model
from megalm.train.config import load_config
from megalm.train.task import LMTask
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import assert_exact_resume, run_distributed
from tests.distributed.muon_jobs import one_step_overrides

pytestmark = pytest.mark.timeout(900)
STAGES = ["zero0", "zero1", "zero2", "zero3", "pp2", "pp2-zero0", "zero1-offload", "zero2-offload",
          "zero3-offload"]
NAN_MODES = ["zero2", "zero3", "zero2-offload"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    shards = make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))
    work = tmp_path_factory.mktemp("work")
    result = run_distributed("tests.distributed.muon_jobs:muon_modes",
                             {"workdir": str(work), "shards": shards, "modes": STAGES,
                              "nan_modes": NAN_MODES}, nproc=2)[0]
    return {"shards": shards, "work": work, "modes": result}


def _initial_and_final(job, mode):
    cfg = load_config(None, one_step_overrides(job["shards"], mode), world_size=2)
    torch.manual_seed(cfg.train.seed)  # as megalm.train.build.build does
    initial = LMTask(cfg).build_model().state_dict()
    final, meta = load_model(os.path.join(job["modes"][mode]["one_dir"], "checkpoints"))
    assert meta["step"] == 1
    return initial, final.state_dict(), cfg.optimizer


@pytest.mark.parametrize("mode", STAGES)
def test_hidden_matrices_get_orthogonalised_updates_head_gets_adamw(job, mode):
    initial, final, o = _initial_and_final(job, mode)
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.1.attention.wo.weight"):
        delta = (final[name] - initial[name]).double()
        s = torch.linalg.svdvals(delta) / o.muon_lr
        # Newton-Schulz scales the top of the spectrum to ~1 (times muon_lr here) and flattens it:
        # measured s[0]/s[n/4] <= 1.3 for Muon against 2.6-5.8 for this gradient's sign (AdamW's
        # first step) or raw (SGD) on these matrices; an SGD step would also be far below lr.
        assert 0.5 < s[0] < 1.5, f"{mode} {name}: singular values / muon_lr {s.tolist()}"
        assert s[0] / s[len(s) // 4] < 1.5, f"{mode} {name}: singular values / muon_lr {s.tolist()}"
    for name in ("output.weight", "tok_embeddings.weight"):
        delta = (final[name] - initial[name]).double().abs()
        moved = delta[delta > 0]
        # AdamW's first step is lr * g / (|g| + eps): lr wherever the gradient is not tiny (the
        # head's every entry; the embedding's rows of the tokens in the batch).
        assert moved.numel() > (0.5 * delta.numel() if name == "output.weight" else 100), f"{mode} {name}"
        assert (moved.max() - o.lr).abs() < 1e-6 and (moved > 0.9 * o.lr).float().mean() > 0.9, f"{mode} {name}"


@pytest.mark.parametrize("mode", STAGES)
def test_exact_resume_with_muon_state(job, mode):
    assert_exact_resume(job["modes"][mode])


@pytest.mark.parametrize("mode", NAN_MODES)
def test_nan_step_is_skipped_and_momentum_stays_finite(job, mode):
    s, records = job["modes"][f"nan-{mode}"]["summary"], job["modes"][f"nan-{mode}"]["records"]
    assert s["finished"] and s["skipped_steps"] == 1 and s["rollbacks"] == 0
    by_data = {r["data_step"]: r["loss"] for r in records}
    assert by_data[3] is None  # the poisoned step (strict JSON: NaN written as null)
    later = [by_data[d] for d in (4, 5)]
    assert all(loss is not None and math.isfinite(loss) for loss in later), later
