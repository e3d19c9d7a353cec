"""`parallel.sequence_parallel: 2` (Ulysses) in the trainer, on 2 real gloo ranks under ZeRO 1/2
(and 4 ranks: 2 data-parallel × 2 sequence-parallel):
- the losses and final weights of the single-process reference (fp32; bound 1e-5 as for the other
  layouts: reduction order only; bf16: 2e-2), with document masks (the corpus packs several
  documents a row);
- N steps + a new engine resuming + N steps == 2N straight steps, bit for bit;
- both ranks read the same batches (one data-parallel rank of size 1);
- a sequence-parallel checkpoint keeps the plain model's names: `megalm sample`'s reader loads it,
  and a run resumes it as plain data parallelism."""

from __future__ import annotations

import os

import pytest
import torch

from megalm.errors import UserError
from megalm.models.load import load_model
from megalm.train.config import load_config
from megalm.train.task import LMTask
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import assert_exact_resume, run_distributed
from tests.distributed.jobs import SEQUENCE_MODEL, SEQUENCE_MODES, small_overrides
from tests.distributed.reference import reference_run

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    shards = make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))
    work = tmp_path_factory.mktemp("work")
    result = run_distributed("tests.distributed.jobs:sequence_parallel",
                             {"workdir": str(work), "shards": shards, "modes": list(SEQUENCE_MODES)}, nproc=2)
    losses, model = reference_run(small_overrides(shards, "reference") + SEQUENCE_MODEL)
    return {"work": work, "shards": shards, "ranks": result, "reference_losses": losses, "reference_model": model, **result[0]}


FP32 = [m for m in SEQUENCE_MODES if "bf16" not in m]


@pytest.fixture(scope="module")
def job4(job, tmp_path_factory):
    work = tmp_path_factory.mktemp("work4")
    return run_distributed("tests.distributed.jobs:sequence_parallel",
                           {"workdir": str(work), "shards": job["shards"], "modes": ["sp2-zero1"],
                            "handover": False}, nproc=4)


@pytest.mark.parametrize("mode", FP32)
def test_matches_single_process_reference(job, mode):
    assert job[mode]["straight_losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)
    _same_weights(os.path.join(job["work"], "runs", f"{mode}-straight", "checkpoints"), job, mode)


def test_bf16_follows_the_reference(job):
    assert job["sp2-zero1-bf16"]["straight_losses"] == pytest.approx(job["reference_losses"], abs=2e-2, rel=0)


def test_four_ranks_two_data_parallel_groups(job, job4):
    assert [r["sp2-zero1"]["straight"]["dp"] for r in job4] == [[0, 2], [0, 2], [1, 2], [1, 2]]
    assert job4[0]["sp2-zero1"]["straight_losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)
    assert_exact_resume(job4[0]["sp2-zero1"])


def _same_weights(root: str, job, mode: str) -> None:
    model, meta = load_model(root)
    assert meta["step"] == 4
    ref = job["reference_model"].state_dict()
    assert list(model.state_dict()) == list(ref)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name].float(), atol=2e-5, rtol=0, msg=f"{mode}: {name}")


@pytest.mark.parametrize("mode", list(SEQUENCE_MODES))
def test_resume_is_exact(job, mode):
    assert_exact_resume(job[mode])


def test_the_group_reads_one_data_parallel_share(job):
    assert [r["sp2-zero1"]["straight"]["dp"] for r in job["ranks"]] == [[0, 1], [0, 1]]
    assert job["sp2-zero1"]["straight"]["guard_reductions"] == 4


def test_resumes_as_plain_data_parallelism(job):
    r = job["sp_then_dp"]
    assert r["first"]["step"] == 2 and r["second"]["finished"]
    assert r["losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)  # 2 steps each way


def test_heads_that_do_not_split_are_refused_when_the_model_is_resolved(tmp_path):
    shards = make_corpus(str(tmp_path / "shards"))
    cfg = load_config(None, small_overrides(shards, "heads") + ["parallel.sequence_parallel=2"], world_size=2)
    with pytest.raises(UserError) as exc:
        LMTask(cfg)
    assert str(exc.value) == ("config: parallel.sequence_parallel: 2 must divide model.n_heads (2) and "
                              "model.n_kv_heads (1)")
