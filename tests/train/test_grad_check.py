"""At ZeRO-0/1/2/3 megalm, not DeepSpeed, checks the gradients for inf/NaN (one multi-tensor norm folded
into the step's one reduction): a non-finite gradient behind a finite loss must still skip the step."""

from __future__ import annotations

import pytest

from tests.distributed.corpus import make_corpus
from tests.distributed.helper import run_distributed

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    shards = make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))
    work = tmp_path_factory.mktemp("work")
    return run_distributed("tests.train.grad_jobs:nonfinite_gradient", {"workdir": str(work), "shards": shards},
                           nproc=2)


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3"])
def test_nan_gradient_with_finite_loss_is_skipped_on_every_rank(result, zero):
    for rank in result:  # both ranks decide alike, though only rank 0's gradient was poisoned
        r = rank[zero]
        assert r["ds_check"] is False  # DeepSpeed's per-parameter check is off: ours must catch it
        first, poisoned, after = r["steps"]
        assert not first["bad"] and first["weights_changed"] and first["grad_norm_finite"]
        assert poisoned["bad"] and poisoned["loss_finite"] and not poisoned["grad_norm_finite"]
        assert not poisoned["weights_changed"]
        assert not after["bad"] and after["weights_changed"] and r["skipped"] == 1
