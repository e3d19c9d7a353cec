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


def test_auto_chunk_size_bounds_chunk_logits_and_keeps_chunks_large():
    budget = flce_mod.CHUNK_LOGITS_BYTES
    # GPT-2 (V=50304) and Llama-3 (V=128256) in bf16: chunks of 4096 and 2048 rows (not 256: each
    # chunk rereads the fp32 dW accumulator), and one chunk's logits stay within the budget.
    assert flce_mod.auto_chunk_size(16 * 1024, 50304, 2) == 4096
    assert flce_mod.auto_chunk_size(4 * 2048, 128256, 2) == 2048
    for n, v, size in ((16384, 50304, 2), (8192, 128256, 2), (8192, 128256, 4), (1 << 20, 256_000, 2)):
        assert flce_mod.auto_chunk_size(n, v, size) * v * size <= max(budget, 256 * v * size)
    assert flce_mod.auto_chunk_size(10, 50, 4) == 10  # small inputs: one chunk
    assert flce_mod.auto_chunk_size(0, 50, 4) == 1


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


# ---- fp16 under DeepSpeed's loss scale; evaluation; memory of the fused linear CE ----------

from tests.ops.memory_accounting import LiveBytes  # noqa: E402


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def test_fp16_gradient_survives_loss_scale_2_16_with_16k_targets():
    """Loss x 65536 (DeepSpeed's initial dynamic loss scale) over 16k targets: the fp16 gradient
    must match fp32 F.cross_entropy to 1e-2 of its largest entry (it used to be inf/NaN/0)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(16384, 1024, generator=g) * 3
    labels = torch.randint(0, 1024, (16384,), generator=g)
    lg = x.half().requires_grad_(True)
    (cross_entropy(lg, labels) * 65536.0).backward()
    ref = x.half().float().requires_grad_(True)
    (F.cross_entropy(ref, labels) * 65536.0).backward()
    assert torch.isfinite(lg.grad).all()
    assert _max_rel_err(lg.grad, ref.grad) <= 1e-2


def test_fp16_backward_factor_above_fp16_max_is_not_cast_to_inf():
    """Loss scale 2^20 over 8 targets: dloss / n = 131072 > fp16 max. Entries whose true value
    fits fp16 must come out finite and right (a factor cast to fp16 would make them all inf/NaN)."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(8, 1000, generator=g)
    labels = torch.randint(0, 1000, (8,), generator=g)
    lg = x.half().requires_grad_(True)
    (cross_entropy(lg, labels) * 2.0**20).backward()
    ref = x.half().float().requires_grad_(True)
    (F.cross_entropy(ref, labels) * 2.0**20).backward()
    fits = ref.grad.abs() < 30000
    assert fits.float().mean() > 0.9
    assert torch.isfinite(lg.grad[fits]).all()
    torch.testing.assert_close(lg.grad[fits].float(), ref.grad[fits], rtol=2e-3, atol=1.0)


def test_fp16_fused_linear_ce_under_loss_scale():
    g = torch.Generator().manual_seed(12)
    h = torch.randn(16384, 32, generator=g)
    w = torch.randn(512, 32, generator=g) * 0.3
    labels = torch.randint(0, 512, (16384,), generator=g)
    hh, wh = h.half().requires_grad_(True), w.half().requires_grad_(True)
    (fused_linear_cross_entropy(hh, wh, labels, chunk_size=4096) * 65536.0).backward()
    hf, wf = hh.detach().float().requires_grad_(True), wh.detach().float().requires_grad_(True)
    (F.cross_entropy(hf @ wf.t(), labels) * 65536.0).backward()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(wh.grad).all()
    assert _max_rel_err(hh.grad, hf.grad) <= 1e-2
    assert _max_rel_err(wh.grad, wf.grad) <= 1e-2


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Evaluation (torch.no_grad) with a weight that requires grad: loss only — no [V, D]
    buffer, no gradient rows written."""
    n, d, v = 64, 16, 4000
    g = torch.Generator().manual_seed(13)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    want = fused_linear_cross_entropy(h, w, labels, chunk_size=16).detach()
    grads_asked = []
    real = flce_mod.ce_rows
    monkeypatch.setattr(flce_mod, "ce_rows", lambda *a, **k: (grads_asked.append(k.get("need_grad", True)),
                                                             real(*a, **k))[1])
    with torch.no_grad(), LiveBytes(h, w) as mem:
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=16)
    assert torch.equal(loss, want)
    assert grads_asked == [False] * 4
    assert not [a for a in mem.allocs if a[1] == (v, d)], mem.allocs
    ce_mod = importlib.import_module("megalm.ops.cross_entropy")
    calls = []
    monkeypatch.setattr(ce_mod, "ce_rows", lambda *a, **k: (calls.append(k.get("need_grad", True)),
                                                           real(*a, **k))[1])
    x = torch.randn(8, 50, requires_grad=True)
    with torch.no_grad():
        cross_entropy(x, torch.randint(0, 50, (8,)))
    assert calls == [False]


def test_live_bytes_counts_what_is_alive():
    with LiveBytes() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.float32)
        del b
        c = a[10:]  # a view: no new storage
        d = torch.empty(200, dtype=torch.float32)
    assert mem.peak == 6000 and mem.current == 4800
    del a, c, d
    assert mem.current == 0


def test_fused_linear_ce_memory_is_one_fp32_dw_plus_chunk_temporaries():
    """bf16 head, V >> chunk: the only [V, D]-sized buffer of the forward is the fp32 dW
    accumulator (the old code made a bf16 and an fp32 [V, D] temporary per chunk), and the peak
    stays within dW + dh + a few fp32 chunk-logit blocks."""
    n, d, v, chunk = 512, 256, 8192, 64
    g = torch.Generator().manual_seed(14)
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(v, d, generator=g) * 0.05).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    with LiveBytes(h, w, labels) as mem:
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk)
        fwd_allocs = list(mem.allocs)
        loss.backward()
    big = [a for a in fwd_allocs if a[3] >= v * d * 2]
    assert [(a[1], a[2]) for a in big] == [((v, d), torch.float32)], big
    dw_fp32, dh, logits_fp32 = v * d * 4, n * d * 2, chunk * v * 4
    bound = dw_fp32 + dh + 4 * logits_fp32 + (1 << 20)
    assert mem.peak <= bound, (mem.peak, bound)
