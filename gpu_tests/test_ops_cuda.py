"""CUDA kernels on a real GPU (`make test-gpu`, after `megalm ops build`).

Every self-test case of every registered kernel runs here as its own test (odd widths, rows
longer than a block, fp32/bf16/fp16, vocab >= 128k, ignored and out-of-range labels, broadcast
RoPE tables, AdamW params + moments at lr 0.1, ...), plus real-scale shapes, the wide-row
fallback of the norm backward, and the absence of host synchronisation in the hot paths.
Accuracy rule: vs a float64 oracle, the kernel's error stays within 2x PyTorch eager's error in
the same dtype (megalm.ops.selftest.compare)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.ops import (FusedAdamW, build, cross_entropy, fused_linear_cross_entropy, layer_norm,
                        rms_norm, selftest, swiglu)
from megalm.ops import _backend
from megalm.ops.registry import KERNELS

DEV = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
CASES = [(k, c) for k in KERNELS for c in k.cases(torch.device("cuda"))]


@pytest.fixture(scope="module", autouse=True)
def extension_built():
    ext = _backend.extension()
    assert ext is not None, f"extension not loaded: {_backend.unavailable_reason()}"


def randn(*shape, seed=0, scale=1.0, shift=0.0):
    return selftest.randn(*shape, device=DEV, seed=seed, scale=scale, shift=shift)


@pytest.mark.parametrize("kernel,case", CASES, ids=[f"{k.name}: {c.name}" for k, c in CASES])
def test_selftest_case(kernel, case):
    selftest.run_case(case, DEV)


def test_build_covers_this_gpu_and_every_kernel_passed_its_recorded_self_test():
    cc = torch.cuda.get_device_capability()
    infos = [i for _, i in build.builds_for_current_sources() if build._covers(i, *cc)]
    assert infos, f"no build covers sm_{cc[0]}{cc[1]}"
    record = selftest.read_record(_backend.build_dir(), DEV)
    assert record is not None, "`megalm ops build` should have recorded self-tests on this GPU"
    failed = {n: r["detail"] for n, r in record["kernels"].items() if not r["ok"]}
    assert not failed, failed
    for k in KERNELS:
        assert selftest.verdict(k.name, DEV)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 333, 1024), (2, 3, 4096), (1, 5, 77)])
def test_rms_norm_real_shapes(dtype, shape):
    ins = [randn(*shape, scale=2, shift=0.5), randn(shape[-1], seed=1)]
    selftest.compare(lambda a, b, backend: rms_norm(a, b, 1e-5, backend=backend), ins, dtype, DEV,
                     "rms_norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_backward_wider_than_shared_memory(dtype):
    """C = 70000: the weight-grad partials no longer fit shared memory; the global path runs."""
    x, w, b = randn(3, 70000, scale=2), randn(70000, seed=1), randn(70000, seed=2)
    selftest.compare(lambda a, ww, backend: rms_norm(a, ww, 1e-5, backend=backend), [x, w], dtype,
                     DEV, "rms_norm wide")
    selftest.compare(lambda a, ww, bb, backend: layer_norm(a, ww, bb, 1e-5, backend=backend),
                     [x, w, b], dtype, DEV, "layer_norm wide")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_real_shape(dtype):
    ins = [randn(4, 100, 2816, scale=3), randn(4, 100, 2816, seed=1)]
    selftest.compare(lambda a, b, backend: swiglu(a, b, backend=backend), ins, dtype, DEV, "swiglu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_vocab_128k_real_rows(dtype):
    v = 128 * 1024
    g = torch.Generator(device=DEV).manual_seed(3)
    labels = torch.randint(0, v, (300,), generator=g, device=DEV)
    labels[::7] = -100
    selftest.compare(lambda a, backend: cross_entropy(a, labels, backend=backend),
                     [randn(300, v, scale=4)], dtype, DEV, "cross_entropy 128k")


def test_cross_entropy_fp32_equals_torch():
    logits = randn(64, 1000, scale=3).float().requires_grad_(True)
    labels = torch.randint(0, 1000, (64,), device=DEV)
    loss = cross_entropy(logits, labels, backend="cuda")
    loss.backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(loss, F.cross_entropy(ref.detach(), labels))
    torch.testing.assert_close(logits.grad, ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_real_shape(dtype):
    g = torch.Generator(device=DEV).manual_seed(4)
    labels = torch.randint(0, 32000, (1000,), generator=g, device=DEV)
    labels[:50] = -100
    ins = [randn(1000, 512), randn(32000, 512, scale=0.05, seed=1)]
    selftest.compare(lambda a, b, backend: fused_linear_cross_entropy(a, b, labels, chunk_size=256,
                                                                     backend=backend),
                     ins, dtype, DEV, "fused_linear_ce")


def test_hot_paths_never_synchronise_with_the_host():
    """AdamW's metadata travels by value; CE's 1/n_targets stays on the device."""
    ps = [torch.nn.Parameter(torch.randn(s, device=DEV, dtype=torch.bfloat16))
          for s in [(4096, 64), (1000,)] + [(37,)] * 50]
    opt = FusedAdamW(ps, lr=1e-3, master_weights=True, backend="cuda")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # allocates state
    h = torch.randn(512, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3000, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3000, (512,), device=DEV)
    fused_linear_cross_entropy(h, w, labels, backend="cuda").backward()  # first use probes GEMMs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        cross_entropy(h.detach().float() @ w.detach().float().t(), labels, backend="cuda")
        fused_linear_cross_entropy(h, w, labels, backend="cuda").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_backend_uses_the_kernel(monkeypatch):
    import importlib

    mod = importlib.import_module("megalm.ops.rms_norm")

    def no_reference(*a, **k):
        raise AssertionError("auto picked the reference on CUDA tensors")

    monkeypatch.delenv("MEGALM_OPS", raising=False)
    monkeypatch.setattr(mod, "rms_norm_reference", no_reference)
    x = randn(8, 64).bfloat16()
    w = torch.ones(64, device=DEV)
    assert torch.equal(rms_norm(x, w), rms_norm(x, w, backend="cuda"))


@pytest.mark.parametrize("dtype,master", [(torch.bfloat16, True), (torch.float32, False)])
def test_adamw_more_blocks_than_one_launch_holds(dtype, master):
    """330 chunks of 65536 in one tensor: the launch batches split it (kAdamMaxBlocks = 320)."""
    from megalm.ops.adamw import check_against_fp32_steps

    check_against_fp32_steps(DEV, dtype, master, [(330 * 65536 + 7,), (5,)] * 2, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (4096, 4096)])
def test_newton_schulz_real_shapes(dtype, shape):
    from megalm.ops.newton_schulz import _check

    _check(randn(*shape, seed=21), dtype, f"newton_schulz {shape}")


def test_auto_newton_schulz_runs_the_kernel_once_self_tested():
    # What Muon calls (megalm.train.muon routes DeepSpeed's Newton-Schulz here; tested on CPU).
    from megalm.ops import newton_schulz

    g = randn(256, 1024, seed=22).float()
    ext = _backend.extension()
    real, calls = ext.newton_schulz, []
    try:
        ext.newton_schulz = lambda *a: calls.append(tuple(a[0].shape)) or real(*a)
        out = newton_schulz(g)
    finally:
        ext.newton_schulz = real
    assert calls == [(256, 1024)] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), newton_schulz(g, backend="cuda").float(), rtol=0, atol=0)


@pytest.mark.parametrize("hq,hk,T,docs", [(12, 12, 1024, [[256] * 4, [100, 300, 24, 600]]),
                                          (8, 2, 2048, [[2048], [1] * 64 + [1984]])])
def test_document_attention_real_shapes(hq, hk, T, docs):
    # GPT-2's head layout at its row length, then a Llama-style grouped layout at 2048: a whole-row
    # document (plain causal) and a row that starts with 64 one-token documents.
    from megalm.ops.doc_attention import document_attention, starts_of_lengths

    starts = starts_of_lengths(docs, DEV)
    B = starts.shape[0]
    ins = [randn(B, T, h, 64, seed=30 + i) for i, h in enumerate((hq, hk, hk))]
    selftest.compare(lambda q, k, v, backend: document_attention(q, k, v, starts, backend=backend), ins,
                     torch.bfloat16, DEV, f"document_attention T{T}")


def test_model_runs_the_document_kernel_in_bf16_training(monkeypatch):
    # megalm.models.llm hands packed rows to the kernel (wiring tested on CPU); here: it does so on
    # a GPU once self-tested, and its loss and grads match the dense-mask path.
    from megalm.models.llm import LLM, LLMConfig

    torch.manual_seed(0)
    model = LLM(LLMConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, max_seq_len=256)).to(DEV, torch.bfloat16)
    ids = torch.randint(0, 512, (2, 256), device=DEV)
    docs = torch.cat([torch.zeros(2, 100), torch.ones(2, 156)], 1).long().to(DEV)
    ext = _backend.extension()
    real, calls = ext.doc_attention_fwd, []
    try:
        ext.doc_attention_fwd = lambda *a: calls.append(1) or real(*a)
        loss = model(ids, doc_ids=docs, labels=ids)
        loss.backward()
    finally:
        ext.doc_attention_fwd = real
    assert len(calls) == 2
    grads = [p.grad.float().clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setenv("MEGALM_OPS", "reference")  # every op, attention included, as on CPU
    ref = model(ids, doc_ids=docs, labels=ids)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad.float(), rtol=5e-2, atol=5e-2)
