"""optimizer.name=muon without ranks: which parameters Muon gets, the schedule's per-group scale,
the config's refusals, and the DeepSpeed config it derives. (Real ranks: tests/distributed/test_muon.)"""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from megalm.train.config import load_config
from megalm.engine.config import to_deepspeed_config
from megalm.train.muon import muon_param_groups
from megalm.train.schedule import LRSchedule, lr_at
from tests.train.test_config import cfg_of, error_of

MUON = ("optimizer.name=muon", "optimizer.grad_clip=0")  # ZeRO-1 (the default) refuses clipping with Muon
SMALL = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, max_seq_len=64)


def test_hidden_matrices_get_muon_and_the_untied_head_does_not():
    model = LLM(LLMConfig(**SMALL, qk_norm=True))
    groups = muon_param_groups(model, cfg_of(*MUON).optimizer)
    muon = {n for n, p in model.named_parameters() if p.use_muon}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert "output.weight" not in muon and "tok_embeddings.weight" not in muon  # DeepSpeed's name rule
    # would hand `output` to Muon: it only spares names with "embed" or "lm_head".
    names = {id(p): n for n, p in model.named_parameters()}
    muon_g, decay_g, other_g = groups
    assert muon_g["use_muon"] and {names[id(p)] for p in muon_g["params"]} == muon
    assert {names[id(p)] for p in decay_g["params"]} == {"tok_embeddings.weight", "output.weight"}
    assert decay_g["weight_decay"] == 0.1 and other_g["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in other_g["params"])  # norms, QK-norm weights
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedule_scales_each_group_by_its_lr_scale():
    o = cfg_of(*MUON, "optimizer.lr=1e-3", "optimizer.muon_lr=0.05").optimizer
    opt = torch.optim.SGD(muon_param_groups(LLM(LLMConfig(**SMALL)), o), lr=1.0)
    sched = LRSchedule(opt, 10, o)
    sched.step()
    sched.step()
    base = lr_at(2, 10, o)
    assert opt.param_groups[0]["lr"] == pytest.approx(base * 50)
    assert [g["lr"] for g in opt.param_groups[1:]] == [base, base]


def test_muon_config_refusals_name_the_key():
    assert "optimizer.name: expected one of adamw, muon, got 'sgd'" in error_of("optimizer.name=sgd")
    assert "optimizer.grad_clip: muon under ZeRO-2 needs 0" in error_of("optimizer.name=muon",
                                                                       "parallel.zero_stage=2")
    # The pipeline's ZeRO-1 and ZeRO-Offload clip the orthogonalised update too (measured: same path).
    assert "optimizer.grad_clip: muon under ZeRO-1 needs 0" in error_of(
        "optimizer.name=muon", "parallel.pipeline_stages=2", "parallel.zero_stage=1")
    assert "optimizer.grad_clip: muon under ZeRO-2 needs 0" in error_of(
        "optimizer.name=muon", "parallel.zero_stage=2", "parallel.offload_optimizer=true")
    assert cfg_of("optimizer.name=muon", "parallel.pipeline_stages=2", "parallel.zero_stage=0").optimizer.name == "muon"
    assert cfg_of(*MUON, "parallel.zero_stage=3", "parallel.offload_optimizer=true").parallel.offload_optimizer
    assert "optimizer.muon_momentum" in error_of(*MUON, "optimizer.muon_momentum=1.0")
    assert cfg_of("optimizer.name=muon", "parallel.zero_stage=0").optimizer.grad_clip == 1.0  # stage 0 clips
    # the raw gradient before Muon's step, which is right


def test_zero3_muon_turns_reduce_scatter_off():
    cfg = cfg_of(*MUON, "parallel.zero_stage=3")
    assert to_deepspeed_config(cfg, 1)["zero_optimization"]["reduce_scatter"] is False
    plain = load_config(None, ["data.paths=[d]", "train.steps=10", "parallel.zero_stage=3"])
    assert "reduce_scatter" not in to_deepspeed_config(plain, 1)["zero_optimization"]


def test_a_pipeline_stage_gets_only_its_own_parameters_tagged_by_structure():
    from megalm.models.pipeline import pipeline_layers

    model = LLM(LLMConfig(**SMALL))
    layers = pipeline_layers(model)
    stage = torch.nn.ModuleList(layers[len(layers) // 2:])  # the later half: blocks + head, no embedding
    groups = muon_param_groups(model, cfg_of(*MUON).optimizer, stage)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [{names[id(p)] for p in g["params"]} for g in groups]
    assert grouped[0] == {n for n, p in model.named_parameters() if n.startswith("layers.1.") and p.dim() == 2}
    assert grouped[1] == {"output.weight"}  # the head stays on AdamW on the last stage too
    assert set().union(*grouped) == {names[id(p)] for p in stage.parameters()}


def test_a_model_without_blocks_is_refused():
    with pytest.raises(UserError, match="optimizer.name: muon needs a model whose transformer blocks"):
        muon_param_groups(torch.nn.Linear(3, 3), cfg_of(*MUON).optimizer)


def test_a_data_parallel_size_change_is_refused_where_muon_momentum_would_be_lost():
    from megalm.train.muon import check_resumable

    def saved(*overrides):
        return cfg_of(*MUON, *overrides).to_dict()

    with pytest.raises(UserError, match=r"optimizer.name: muon: this checkpoint was trained on data-parallel "
                                        r"size 2 \(ZeRO-3\); resuming on 1 would lose"):
        check_resumable(saved("parallel.zero_stage=3"), 2, 1)
    with pytest.raises(UserError, match=r"size 1 \(ZeRO-0, bf16\)"):
        check_resumable(saved("parallel.zero_stage=0"), 1, 2)  # the bf16 optimizer partitions it
    with pytest.raises(UserError, match=r"size 2 \(ZeRO-1, pipeline\)"):
        check_resumable(saved("parallel.pipeline_stages=2"), 4, 1)  # DP = world / stages
    with pytest.raises(UserError, match=r"\(ZeRO-2, offload\)"):
        check_resumable(saved("parallel.zero_stage=2", "parallel.offload_optimizer=true"), 2, 1)
    check_resumable(saved("parallel.zero_stage=3"), 2, 2)  # same DP size: DeepSpeed's own load
    check_resumable(saved("parallel.zero_stage=2"), 2, 1)  # re-sharded (tests/distributed/test_muon_world)
    check_resumable(saved("parallel.zero_stage=1"), 1, 2)
    check_resumable(saved("parallel.zero_stage=0", "precision.dtype=fp32"), 2, 1)  # whole state
    check_resumable(saved("parallel.pipeline_stages=2"), 4, 2)
    check_resumable(cfg_of("parallel.zero_stage=3").to_dict(), 2, 1)  # AdamW: universal conversion
