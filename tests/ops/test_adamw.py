"""FusedAdamW's reference path against torch.optim.AdamW, and its fp32 master-weight mode."""

from __future__ import annotations

import copy

import pytest
import torch

from megalm.ops import FusedAdamW


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in [(7, 5), (11,), (3, 2, 4)]]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(opt_cls, params, steps, groups=None, **kw):
    opt = opt_cls(groups or params, **kw)
    for s in range(steps):
        for p, gr in zip(params, _grads(s, params)):
            p.grad = gr
        opt.step()
    return opt


HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_matches_torch_adamw_bit_for_bit_fp32():
    ours, ref = _params(), _params()
    _run(FusedAdamW, ours, 6, **HYPER)
    _run(torch.optim.AdamW, ref, 6, foreach=False, **HYPER)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_close_to_torch_foreach_and_param_groups():
    ours, ref = _params(seed=1), _params(seed=1)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0, "lr": 1e-2}]  # noqa: E731
    _run(FusedAdamW, ours, 4, groups(ours), **HYPER)
    _run(torch.optim.AdamW, ref, 4, groups(ref), foreach=True, **HYPER)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bf16_without_master_matches_torch_in_bf16():
    ours, ref = _params(torch.bfloat16, 2), _params(torch.bfloat16, 2)
    _run(FusedAdamW, ours, 3, **HYPER)
    _run(torch.optim.AdamW, ref, 3, foreach=False, **HYPER)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_master_weights_follow_the_fp32_trajectory():
    """bf16 params + fp32 master == fp32 AdamW fed the same grads; the param is its rounding."""
    ours = _params(torch.bfloat16, 3)
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = FusedAdamW(ours, master_weights=True, **HYPER)
    ref = torch.optim.AdamW(fp32, foreach=False, **HYPER)
    for s in range(5):
        grads = _grads(s, ours)
        for p, q, gr in zip(ours, fp32, grads):
            p.grad, q.grad = gr, gr.float()
        opt.step()
        ref.step()
    for p, q in zip(ours, fp32):
        st = opt.state[p]
        assert st["master"].dtype == st["exp_avg"].dtype == torch.float32
        assert torch.equal(st["master"], q.detach())
        assert torch.equal(p.detach(), q.detach().bfloat16())
    # small lr updates that bf16 alone would round away still accumulate in the master
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = FusedAdamW([p], lr=1e-4, master_weights=True)
    for _ in range(30):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["master"][0].item() == pytest.approx(1 - 30e-4, abs=1e-5)
    assert p[0].item() == pytest.approx(1 - 30e-4, abs=8e-3) and p[0].item() < 1.0


def _round_trip(dtype, **kw):
    """3 steps, state_dict -> a fresh optimizer over equal params, then both take steps 3 and 4."""
    a, b = _params(dtype, 4), _params(dtype, 4)
    opt_a = _run(FusedAdamW, a, 3, **kw, **HYPER)
    opt_b = FusedAdamW(b, **kw, **HYPER)
    with torch.no_grad():
        for pa, pb in zip(a, b):
            pb.copy_(pa)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    loaded = [{k: v.dtype for k, v in opt_b.state[pb].items() if k != "step"} for pb in b]
    for s in range(3, 5):
        for pa, pb, gr in zip(a, b, _grads(s, a)):
            pa.grad, pb.grad = gr, gr.clone()
        opt_a.step()
        opt_b.step()
    return a, b, opt_a, opt_b, loaded


def test_state_dict_round_trip_continues_identically():
    a, b, *_ = _round_trip(torch.float32)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_master_weights_survive_a_state_dict_round_trip():
    """torch's Optimizer.load_state_dict would round the fp32 masters and moments of bf16 params to
    bf16 (and the next step would fail on mixed dtypes); they load as saved, and continue exactly."""
    a, b, opt_a, opt_b, loaded = _round_trip(torch.bfloat16, master_weights=True)
    assert loaded == [dict.fromkeys(("master", "exp_avg", "exp_avg_sq"), torch.float32)] * len(b)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(opt_a.state[pa]["master"], opt_b.state[pb]["master"])


def test_state_saved_without_masters_loads_in_the_params_dtype():
    """A state without masters (fp32 training) loaded for bf16 params follows torch: moments in bf16,
    the layout the kernel steps for a param without a master (fp32 moments would be misread)."""
    a = _params(torch.float32, 6)
    opt_a = _run(FusedAdamW, a, 2, **HYPER)
    b = [torch.nn.Parameter(p.detach().bfloat16()) for p in a]
    opt_b = FusedAdamW(b, master_weights=True, **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for pb in b:
        assert "master" not in opt_b.state[pb] and opt_b.state[pb]["exp_avg"].dtype == torch.bfloat16


def test_validates_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(_params(), lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        FusedAdamW(_params(), lr=-1.0)
