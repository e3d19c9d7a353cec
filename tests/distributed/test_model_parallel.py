"""Model parallelism in the trainer on real gloo ranks: `parallel.tensor_parallel: 2` (DeepSpeed
AutoTP, Megatron's column/row split) and `parallel.sequence_parallel: 2` (Ulysses), each under
ZeRO 0/1/2/3, with and without activation checkpointing, on 2 ranks; each as 2 data-parallel × 2,
and both at once (TP 2 × SP 2, ZeRO 1/2), on 4 ranks:
- the losses, gradient norms (before clipping) and final weights of the single-process reference
  (fp32; bound 1e-5 as for the other layouts: reduction order only; bf16: 2e-2), with document
  masks (the corpus packs several documents a row);
- N steps + a new engine resuming + N steps == 2N straight steps, bit for bit;
- the ranks of a TP or SP group read the same batches (one data-parallel share);
- checkpoints keep the plain model's names; the weights read back (megalm.engine.layout, the reader
  of `megalm sample` and export; for TP from each rank's slices) equal the reference's;
- a TP=2 checkpoint resumes at TP=1 and a TP=1 one at TP=2 (ZeRO-1: universal conversion merges the
  slices and the optimizer state), an SP=2 one as plain data parallelism, on the reference's loss
  curve; a ZeRO-0 TP checkpoint at another TP size is refused in one line.
The export of a TP checkpoint to transformers is checked in tests/export/test_hf.py."""

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
from tests.distributed.jobs import (SEQUENCE_MODEL, SEQUENCE_MODES, TENSOR_MODES, TENSOR_SEQUENCE_MODEL,
                                    TENSOR_SEQUENCE_MODES, small_overrides)
from tests.distributed.reference import reference_run

pytestmark = pytest.mark.timeout(900)
MODES = [*TENSOR_MODES, *SEQUENCE_MODES]
FP32 = [m for m in MODES if "bf16" not in m]
# Resumed as well (each costs two more trainings; ZeRO-1 resumes are held on 4 ranks).
RESUMED = ["tp2-zero3", "tp2-zero1-bf16", "sp2-zero2", "sp2-zero3"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    shards = make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))
    work = tmp_path_factory.mktemp("work")
    ranks = run_distributed("tests.distributed.jobs:model_parallel",
                            {"workdir": str(work), "shards": shards, "modes": MODES, "resume_modes": RESUMED,
                             "handover": True}, nproc=2)
    norms: list[float] = []
    losses, model = reference_run(small_overrides(shards, "reference") + SEQUENCE_MODEL, grad_norms=norms)
    return {"work": work, "shards": shards, "ranks": ranks, "reference_losses": losses, "reference_model": model,
            "reference_grad_norms": norms, **ranks[0]}


@pytest.fixture(scope="module")
def job4(job, tmp_path_factory):
    work = tmp_path_factory.mktemp("work4")
    ranks = run_distributed("tests.distributed.jobs:model_parallel",
                            {"workdir": str(work), "shards": job["shards"],
                             "modes": ["tp2-zero1", "sp2-zero3", *TENSOR_SEQUENCE_MODES],
                             "resume_modes": ["tp2sp2-zero1"]}, nproc=4)
    losses, model = reference_run(small_overrides(job["shards"], "reference4") + TENSOR_SEQUENCE_MODEL)
    return {"work": work, "ranks": ranks, "reference_losses": losses, "reference_model": model}


@pytest.mark.parametrize("mode", FP32)
def test_matches_single_process_reference(job, mode):
    assert job[mode]["straight_losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)
    # The norm sees a gradient scale Adam hides (ZeRO-3's reduce-scatter averages SP shares too).
    assert job[mode]["straight_grad_norms"] == pytest.approx(job["reference_grad_norms"], rel=1e-4)
    model, meta = load_model(os.path.join(job["work"], "runs", f"{mode}-straight", "checkpoints"))
    assert meta["step"] == 4 and (meta.get("tensor_parallel") or {}).get("size", 1) == (2 if "tp" in mode else 1)
    ref = job["reference_model"].state_dict()
    assert list(model.state_dict()) == list(ref)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name].float(), atol=2e-5, rtol=0, msg=f"{mode}: {name}")


@pytest.mark.parametrize("mode", [m for m in MODES if "bf16" in m])
def test_bf16_follows_the_reference(job, mode):
    assert job[mode]["straight_losses"] == pytest.approx(job["reference_losses"], abs=2e-2, rel=0)


@pytest.mark.parametrize("mode", RESUMED)
def test_resume_is_exact(job, mode):
    assert_exact_resume(job[mode])


def test_a_group_reads_one_data_parallel_share(job):
    for mode in ("tp2-zero1", "sp2-zero1"):
        assert [r[mode]["straight"]["dp"] for r in job["ranks"]] == [[0, 1], [0, 1]]
        assert job[mode]["straight"]["guard_reductions"] == 4
    files = os.listdir(os.path.join(job["work"], "runs", "tp2-zero0-straight", "checkpoints", "step_00000004"))
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files)  # a slice per TP rank


@pytest.mark.parametrize("name", ["tp-then-dp", "dp-then-tp", "sp_then_dp"])
def test_resumes_in_another_layout(job, name):
    r = job[name]
    assert r["first"]["step"] == 2 and r["second"]["finished"]
    assert r["losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)  # 2 steps each way


def test_zero0_tensor_parallel_checkpoint_keeps_its_size(job):
    assert job["zero0_refused"] == {
        "ok": False, "error": "parallel.tensor_parallel: a ZeRO-0 checkpoint saved with tensor_parallel=2 resumes "
                              "only at tensor_parallel=2, got 1 (ZeRO 1-3 checkpoints change the TP size through "
                              "universal conversion)"}


@pytest.mark.parametrize("mode", ["tp2-zero1", "sp2-zero3"])
def test_four_ranks_two_data_parallel_groups(job, job4, mode):
    assert [r[mode]["straight"]["dp"] for r in job4["ranks"]] == [[0, 2], [0, 2], [1, 2], [1, 2]]
    assert job4["ranks"][0][mode]["straight_losses"] == pytest.approx(job["reference_losses"], abs=1e-5, rel=0)


@pytest.mark.parametrize("mode", list(TENSOR_SEQUENCE_MODES))
def test_tensor_and_sequence_parallel_together(job4, mode):
    """4 ranks, one data-parallel group: 2 TP ranks each split their heads again over 2 SP ranks."""
    r = job4["ranks"][0][mode]
    assert [x[mode]["straight"]["dp"] for x in job4["ranks"]] == [[0, 1]] * 4
    assert r["straight_losses"] == pytest.approx(job4["reference_losses"], abs=1e-5, rel=0)
    model, meta = load_model(os.path.join(job4["work"], "runs", f"{mode}-straight", "checkpoints"))
    assert meta["tensor_parallel"]["size"] == 2
    ref = job4["reference_model"].state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name].float(), atol=2e-5, rtol=0, msg=f"{mode}: {name}")


def test_four_ranks_resume_exactly(job4):
    assert_exact_resume(job4["ranks"][0]["tp2sp2-zero1"])


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.tensor_parallel=2"], "config: parallel.tensor_parallel: 2 must divide model.n_heads (2) and "
                                     "model.n_kv_heads (1)"),
    (["parallel.tensor_parallel=2", "model.n_kv_heads=2", "model.mlp_hidden=33"],
     "config: parallel.tensor_parallel: 2 must divide the MLP width (33, model.mlp_hidden, or derived from model.dim)"),
    (["parallel.tensor_parallel=2", "model.n_kv_heads=2", "model.value_embeds=1"],
     "config: parallel.tensor_parallel: model.value_embeds is not supported with tensor parallelism yet (the value "
     "embeddings would need the same split as wv); expected 0"),
    (["parallel.sequence_parallel=2"], "config: parallel.sequence_parallel: 2 must divide model.n_heads (2) and "
                                       "model.n_kv_heads (1)"),
    (["parallel.sequence_parallel=2", "parallel.tensor_parallel=2", "model.n_kv_heads=2"],
     "config: parallel.sequence_parallel: 2 × tensor_parallel 2 must divide model.n_heads (2) and model.n_kv_heads (2)"),
])
def test_models_that_do_not_split_are_refused(tmp_path, overrides, expected):
    shards = make_corpus(str(tmp_path / "shards"))
    cfg = load_config(None, small_overrides(shards, "split") + overrides, world_size=4)
    with pytest.raises(UserError) as exc:
        LMTask(cfg)
    assert str(exc.value) == expected
