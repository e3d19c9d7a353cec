"""megalm.ops.doc_attention on CPU: the reference, argument errors, and how the model reaches the
kernel (the kernels' own arithmetic: test_doc_attention_emu.py; on a GPU: the self-test)."""

from __future__ import annotations

import pytest
import torch

import megalm.models.llm as llm
from megalm.ops import doc_attention
from megalm.ops.doc_attention import document_attention, document_starts, reference, starts_of_lengths
from tests.models.common import build, packed_batch
from tests.models.naive import naive_logits


def test_reference_is_per_document_causal_attention_with_grouped_heads():
    starts = starts_of_lengths([[3, 5, 1, 7]], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = reference(q, k, v, starts)
    for h in range(4):
        kh, vh = k[0, :, h // 2], v[0, :, h // 2]
        for i in range(16):
            j = slice(int(starts[0, i]), i + 1)
            w = torch.softmax(q[0, i, h] @ kh[j].T / 8 ** 0.5, -1)
            torch.testing.assert_close(got[0, i, h], w @ vh[j])


def test_bad_shapes_are_one_line_errors():
    q = torch.zeros(2, 8, 4, 64)
    with pytest.raises(ValueError, match=r"document_attention: q \(2, 8, 4, 64\), k \(2, 8, 3, 64\)"):
        document_attention(q, torch.zeros(2, 8, 3, 64), torch.zeros(2, 8, 3, 64), torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="starts"):
        document_attention(q, q, q, torch.zeros(2, 7, dtype=torch.int32))


def test_kernel_fits_only_what_it_was_built_for():
    bf = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    assert doc_attention.kernel_fits(bf(1, 4, 4, 64), bf(1, 4, 2, 64), bf(1, 4, 2, 64))
    assert doc_attention.kernel_fits(bf(1, 4, 2, 128), bf(1, 4, 2, 128), bf(1, 4, 2, 128))
    assert not doc_attention.kernel_fits(bf(1, 4, 4, 32), bf(1, 4, 4, 32), bf(1, 4, 4, 32))      # head dim
    assert not doc_attention.kernel_fits(bf(1, 4, 3, 64), bf(1, 4, 2, 64), bf(1, 4, 2, 64))      # groups
    f32 = torch.zeros(1, 4, 4, 64)
    assert not doc_attention.kernel_fits(f32, f32, f32)                                          # dtype
    # On CPU the model never asks for the kernel.
    assert not doc_attention.kernel_will_run(bf(1, 4, 4, 64), bf(1, 4, 4, 64), bf(1, 4, 4, 64))


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_model_hands_packed_rows_to_the_kernel_with_document_starts(shape, monkeypatch):
    """Where the kernel runs (here: its reference stands in, as on a GPU) the model calls it in
    every layer with the document starts made once per forward, and never builds the T x T mask."""
    model = build(shape)
    ids, pos, docs, _ = packed_batch([5, 7, 4])
    want = naive_logits(model, ids, pos, docs)
    calls = []

    def kernel(q, k, v, starts):
        calls.append(starts)
        return reference(q, k, v, starts)
    monkeypatch.setattr(llm, "kernel_will_run", lambda q, k, v: True)
    monkeypatch.setattr(llm, "document_attention", kernel)
    monkeypatch.setattr(llm, "document_mask", lambda doc_ids: pytest.fail("dense mask built"))
    torch.testing.assert_close(model(ids, pos, docs), want)
    assert len(calls) == model.config.n_layers and all(c is calls[0] for c in calls)
    assert torch.equal(calls[0], document_starts(docs))


def test_attention_dropout_in_training_keeps_the_dense_mask(monkeypatch):
    model = build("llama", dropout=0.1).train()
    ids, pos, docs, _ = packed_batch([5, 7])
    monkeypatch.setattr(llm, "kernel_will_run", lambda q, k, v: True)
    monkeypatch.setattr(llm, "document_attention", lambda *a: pytest.fail("kernel without dropout used"))
    model(ids, pos, docs)


def test_head_dim_128_only_where_the_gpu_has_the_shared_memory(monkeypatch):
    # sm_86/sm_89 (A10, L4, L40S) give a block 99 KiB: D=128's 121 KiB would fail to launch there.
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(doc_attention, "smem_per_block", lambda index: 101_376)
    assert doc_attention.head_dim_fits(64, cuda0) and not doc_attention.head_dim_fits(128, cuda0)
    monkeypatch.setattr(doc_attention, "smem_per_block", lambda index: 232_448)  # H100/H200
    assert doc_attention.head_dim_fits(64, cuda0) and doc_attention.head_dim_fits(128, cuda0)
    assert [c.name.split()[3] for c in doc_attention.selftest_cases(torch.device("cpu"))].count("D128") == 2
