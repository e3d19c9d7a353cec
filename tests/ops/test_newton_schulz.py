"""Newton–Schulz on CPU: the bf16 reference against the same iteration in float64, bit-identity
with DeepSpeed's own quintic iteration, the orthogonalising effect, dispatch, and Muon's routing.
(The CUDA kernel: its binding contract in test_cuda_plumbing.py, compiled in test_cuda_build.py,
run on a GPU in gpu_tests/.)"""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.ops import newton_schulz, newton_schulz_reference

SHAPES = [(37, 101), (101, 37), (64, 64), (3, 24, 40)]


def _g(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _quintic64(g: torch.Tensor) -> torch.Tensor:
    """The iteration written out independently: p(X) = aX + b(XXᵀ)X + c(XXᵀ)²X, 5 times, on the
    wide orientation of X = G/||G||_F, all in float64, one matrix at a time."""
    if g.dim() == 3:
        return torch.stack([_quintic64(m) for m in g])
    x = g.double().T if g.shape[0] > g.shape[1] else g.double()
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x - 4.7750 * gram @ x + 2.0315 * gram @ gram @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_follows_the_float64_iteration(shape):
    g = _g(shape)
    oracle = _quintic64(g)
    exact = newton_schulz_reference(g)  # float64 in: the same composition in float64
    assert exact.dtype == torch.float64 and torch.allclose(exact, oracle, rtol=0, atol=1e-12)
    ref = newton_schulz_reference(g.float())
    assert ref.dtype == torch.bfloat16 and ref.shape == g.shape
    # bf16 (8-bit mantissa) at every product of 5 iterations: measured 2.5-3.9% relative
    # Frobenius error on these shapes (the input's own rounding to bf16 is 0.17%).
    err = (ref.double() - oracle).norm() / oracle.norm()
    assert err < 0.06, err


def test_float64_iteration_flattens_the_spectrum():
    # A spectrum spread over 2 decades comes out within the quintic's band (it trades exact
    # orthogonality for speed: singular values land around 0.7-1.2, not at 1). The slope at 0 is
    # a = 3.4445, so 5 steps lift a singular value by at most ~485x: 2 decades after the norm is.
    u, _ = torch.linalg.qr(_g((48, 48), 1))
    v, _ = torch.linalg.qr(_g((96, 48), 2))
    s = torch.logspace(0, -2, 48, dtype=torch.float64)
    g = (u * s) @ v.T
    out = torch.linalg.svdvals(newton_schulz_reference(g))
    assert out.min() > 0.6 and out.max() < 1.25, out
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 90


@pytest.mark.parametrize("shape", [(37, 101), (101, 37)])
def test_reference_is_deepspeeds_quintic_iteration_bit_for_bit(shape):
    import importlib.util

    from deepspeed.runtime.zero.muon import original_muon

    # A private copy of DeepSpeed's module: megalm's Muon re-points the name in the real one.
    spec = importlib.util.spec_from_file_location("ds_original_muon_copy", original_muon.__file__)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    assert theirs.ns_compute_dtype("standard") == torch.bfloat16  # DeepSpeed's CPU accelerator
    g = _g(shape).float()
    # Their function is torch.compiled (inductor fuses and keeps fp32 between ops); its source,
    # run eagerly like ours, is the same composition.
    assert torch.equal(newton_schulz_reference(g), theirs.zeropower_via_newtonschulz5.__wrapped__(g, 5))


def test_dispatch_on_cpu():
    g = _g((8, 12)).float()
    assert torch.equal(newton_schulz(g), newton_schulz_reference(g))  # auto: CPU -> reference
    with pytest.raises(UserError, match="backend='cuda'"):
        newton_schulz(g, backend="cuda")
    with pytest.raises(ValueError, match="expected a matrix"):
        newton_schulz(torch.ones(5))


def test_muon_orthogonalises_through_megalm_newton_schulz():
    from deepspeed.runtime.zero.muon import original_muon

    from megalm.models.llm import LLM, LLMConfig
    from megalm.engine.muon import guarded_muon
    from megalm.train.muon import muon_param_groups
    from tests.train.test_config import cfg_of

    model = LLM(LLMConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, max_seq_len=16))
    groups = muon_param_groups(model, cfg_of("optimizer.name=muon", "optimizer.grad_clip=0").optimizer)
    guarded_muon(groups, lambda: False)
    assert groups[0]["ns_method"] == "standard"
    routed = original_muon.zeropower_via_newtonschulz5
    assert routed._torchdynamo_orig_callable is newton_schulz
    guarded_muon(groups, lambda: False)  # a second optimizer: still one layer of routing
    assert original_muon.zeropower_via_newtonschulz5 is routed
    grad = _g((32, 96), 3).float()
    update = original_muon.muon_update(grad.clone(), torch.zeros_like(grad), beta=0.95, ns_method="standard")
    # Nesterov on a zero momentum: the orthogonalised input is 0.05 * grad, up to the compiled
    # lerp's last-bit rounding, which 5 bf16 iterations turn into bf16-level noise (see above).
    expected = newton_schulz_reference(grad * 0.05).float()
    assert update.dtype == torch.float32
    assert (update - expected).norm() / expected.norm() < 0.06
