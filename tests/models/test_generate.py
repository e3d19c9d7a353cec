"""KV-cache generation against step-by-step full forwards; sampling options; argument errors."""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.generate import LayerKVCache, sample_next
from tests.models.common import build


def full_forward_greedy(model, idx, n):
    for _ in range(n):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("shape", ["llama", "gpt2", "mqa"])
def test_kv_cache_greedy_equals_full_forward_argmax(shape):
    model = build(shape).eval()
    prompt = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    assert torch.equal(out, full_forward_greedy(model, prompt, 12))


def test_prefill_in_chunks_equals_one_prefill():
    # New tokens appended to a non-empty cache must use end-aligned causal masking.
    model = build("llama").eval()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(10).unsqueeze(0)
    cache = [LayerKVCache(10) for _ in model.layers]
    model.forward_cached(ids[:, :4], pos[:, :4], cache)
    chunked = model.forward_cached(ids[:, 4:], pos[:, 4:], cache)
    torch.testing.assert_close(chunked, model(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_generate_restores_training_mode_and_needs_no_grad():
    model = build("llama").train()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, temperature=0)
    assert model.training and not out.requires_grad


def test_eos_stops_and_pads_finished_rows():
    model = build("llama").eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(7))
    greedy = model.generate(prompt, max_new_tokens=10, temperature=0)
    eos = int(greedy[0, 6])  # row 0's second generated token
    out = model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=eos)
    row0_end = 5 + int((greedy[0, 5:] == eos).nonzero()[0]) + 1
    assert torch.equal(out[0, :row0_end], greedy[0, :row0_end])
    assert (out[0, row0_end:] == eos).all()
    hits = (greedy[1, 5:] == eos).nonzero()
    expected_len = 15 if len(hits) == 0 else max(row0_end, 5 + int(hits[0]) + 1)
    assert out.shape[1] == expected_len


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    model = build("gpt2").eval()
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(8))
    a = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_p=1e-6), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # Nucleus 0.7: tokens 0 (0.5) and 1 (0.5 + 0.3 >= 0.7) stay; 2 and 3 go.
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample_next(logits, generator=g), minlength=4) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


@pytest.mark.parametrize("kwargs,key", [
    ({"max_new_tokens": 60}, "max_new_tokens"),  # 5 + 60 > max_seq_len 64
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_generation_arguments_name_the_argument(kwargs, key):
    model = build("llama")
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(UserError, match=rf"^{key}: "):
        model.generate(torch.zeros(1, 5, dtype=torch.long), **args)
