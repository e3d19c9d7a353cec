"""Cross-entropy (loss + grad in one pass) and the chunked fused linear + CE, vs F.cross_entropy."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import cross_entropy, fused_linear_cross_entropy

# The package re-exports the function under the module's name, so fetch the module itself.
flce_mod = importlib.import_module("megalm.ops.fused_linear_cross_entropy")


def _data(n, v, seed, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_matches_torch(dtype):
    logits, labels = _data(37, 101, 0)
    lg = logits.to(dtype).requires_grad_(True)
    loss = cross_entropy(lg, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    ref = logits.to(dtype).float().requires_grad_(True)
    want = F.cross_entropy(ref, labels, ignore_index=-100)
    want.backward()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert lg.grad.dtype == dtype  # the stored gradient keeps the logits dtype
    torch.testing.assert_close(lg.grad.float(), ref.grad, atol=tol, rtol=tol)
    assert torch.all(lg.grad[::4] == 0)  # ignored rows get no gradient


def test_cross_entropy_custom_ignore_index_upstream_grad_and_gradcheck():
    logits, labels = _data(9, 13, 1)
    labels[labels == -100] = 7
    l64 = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, labels, ignore_index=7), (l64,))
    (cross_entropy(l64, labels, ignore_index=7) * 3.5).backward()
    ref = logits.double().requires_grad_(True)
    (F.cross_entropy(ref, labels, ignore_index=7) * 3.5).backward()
    torch.testing.assert_close(l64.grad, ref.grad)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    lg = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(lg, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lg.grad == 0)


def test_cross_entropy_bad_label_raises():
    with pytest.raises(IndexError):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.randn(3, 5, 2), torch.tensor([0, 1, 1]))


def test_cross_entropy_stable_for_huge_logits():
    lg = torch.tensor([[1e4, 0.0, -1e4], [-3e4, 3e4, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 1])
    loss = cross_entropy(lg, labels)
    want = F.cross_entropy(lg.detach(), labels)
    assert torch.isfinite(loss) and torch.isclose(loss, want)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, None])
def test_fused_linear_ce_equals_plain(chunk_size):
    g = torch.Generator().manual_seed(2)
    n, d, v = 23, 16, 57
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3:9] = -100
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(loss * 2.0, (h, w))
    want = F.cross_entropy(h @ w.t(), labels)
    wh, ww = torch.autograd.grad(want * 2.0, (h, w))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)


def test_fused_linear_ce_batched_hidden_and_frozen_weight():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g)  # no grad wanted for the weight
    labels = torch.randint(0, 30, (2, 7), generator=g)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, (h,))
    want = F.cross_entropy((h @ w.t()).reshape(-1, 30), labels.reshape(-1))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gh, torch.autograd.grad(want, (h,))[0])


def test_fused_linear_ce_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 3, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_cross_entropy(a, b, labels, chunk_size=4), (h, w))


def test_fused_linear_ce_bf16_accumulates_weight_grad_in_fp32():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(64, 16, generator=g)
    w = torch.randn(40, 16, generator=g) * 0.1
    labels = torch.randint(0, 40, (64,), generator=g)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    loss = fused_linear_cross_entropy(hb, wb, labels, chunk_size=8)
    loss.backward()
    assert wb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16
    hf, wf = hb.detach().float().requires_grad_(True), wb.detach().float().requires_grad_(True)
    F.cross_entropy(hf @ wf.t(), labels).backward()
    torch.testing.assert_close(loss, F.cross_entropy(hf @ wf.t(), labels), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(wb.grad.float(), wf.grad, atol=3e-3, rtol=3e-2)


def test_fused_linear_ce_never_builds_full_logits(monkeypatch):
    """Every CE call sees at most chunk_size rows: the [N, V] logits never exist at once."""
    seen = []
    real = flce_mod.ce_rows

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(flce_mod, "ce_rows", spy)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (50,))
    fused_linear_cross_entropy(h, w, labels, chunk_size=16).backward()
    assert seen == [(16, 1000), (16, 1000), (16, 1000), (2, 1000)]


def test_auto_chunk_size_bounds_chunk_logits():
    assert flce_mod.auto_chunk_size(8192, 128_000, 4096) <= 512
    assert flce_mod.auto_chunk_size(10, 50, 16) == 10


def test_fused_linear_ce_under_autocast_matches_explicit_cast():
    # Regression: the chunked matmul under autocast came out bf16 while the dh buffer was fp32.
    torch.manual_seed(0)
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=4)
    loss.backward()
    ref = fused_linear_cross_entropy(h.detach().bfloat16(), w.detach().bfloat16(), labels, chunk_size=4)
    assert torch.equal(loss, ref)
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
