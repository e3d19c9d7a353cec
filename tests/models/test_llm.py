"""The LLM against an explicit float64 implementation, packing, GQA, positions, checkpointing."""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from tests.models.common import LLAMA, SHAPES, build, packed_batch
from tests.models.naive import naive_logits, naive_loss

# float64 end to end (the ops' reference path keeps fp64): only summation order differs.
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_naive_implementation(shape):
    model = build(shape)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    logits = model(ids)
    assert logits.shape == (2, 11, 61) and logits.dtype == torch.float64
    expected = naive_logits(model, ids)
    torch.testing.assert_close(logits, expected, **TOL)
    loss = model(ids, labels=labels)
    assert loss.dim() == 0 and loss.dtype == torch.float64  # at least fp32; fp64 here
    torch.testing.assert_close(loss, naive_loss(expected, labels), **TOL)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_packed_documents_match_separate_runs(shape):
    model = build(shape)
    lengths = [5, 7, 4]
    ids, pos, docs, labels = packed_batch(lengths)
    packed_logits = model(ids, pos, docs)
    torch.testing.assert_close(packed_logits, naive_logits(model, ids, pos, docs), **TOL)

    losses, counts, start = [], [], 0
    for n in lengths:
        seg = slice(start, start + n)
        alone = model(ids[:, seg])  # positions 0..n-1, no doc_ids: the causal fast path
        torch.testing.assert_close(packed_logits[:, seg], alone, **TOL)
        losses.append(model(ids[:, seg], labels=labels[:, seg]))
        counts.append(int((labels[:, seg] != -100).sum()))
        start += n
    weighted = sum(loss * c for loss, c in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(model(ids, pos, docs, labels=labels), weighted, **TOL)
    # Sensitivity: without doc_ids, later documents see earlier ones and the loss changes.
    assert not torch.allclose(model(ids, pos, labels=labels), weighted, **TOL)


def test_rope_is_relative_and_learned_positions_are_absolute():
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    shifted = torch.arange(9).unsqueeze(0) + 17
    rope = build("llama")
    torch.testing.assert_close(rope(ids, shifted), rope(ids), **TOL)
    assert not torch.allclose(rope(ids[:, torch.randperm(9)]), rope(ids), **TOL)
    learned = build("gpt2")
    assert learned.pos_embeddings is not None and learned.pos_embeddings.weight.shape == (64, 32)
    assert not torch.allclose(learned(ids, shifted), learned(ids), **TOL)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_head_shapes(n_kv_heads):
    model = build("llama", n_kv_heads=n_kv_heads, dtype=torch.float32)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 8, 32)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (n_kv_heads * 8, 32)
    assert attn.wo.weight.shape == (32, 4 * 8)
    ids = torch.randint(0, 61, (3, 10))
    assert model(ids).shape == (3, 10, 61)


def test_mlp_width_rules():
    assert LLMConfig(**LLAMA).ffn_hidden == 96  # int(2 * 4 * 32 / 3) = 85 -> rounded up to 16
    assert LLMConfig(**{**LLAMA, "ffn_dim_multiplier": 1.3}).ffn_hidden == 112  # int(1.3 * 85) = 110
    assert LLMConfig(**{**LLAMA, "mlp_hidden": 50}).ffn_hidden == 50
    assert LLMConfig(**{**SHAPES["gpt2"], "multiple_of": 1}).ffn_hidden == 128  # GELU: 4 * dim
    assert LLMConfig(**SHAPES["gpt2"]).ffn_hidden == 256  # ... rounded up to multiple_of=256


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_identical_grads(every):
    def run(checkpointing):
        model = build("llama", dtype=torch.float32, n_layers=4, dropout=0.1, activation_checkpointing=checkpointing)
        calls = [0] * 4
        for i, block in enumerate(model.layers):
            block.attention.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        ids, pos, docs, labels = packed_batch([6, 10])
        torch.manual_seed(123)  # same dropout masks in both runs
        loss = model(ids, pos, docs, labels=labels)
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}, calls

    loss_ref, grads_ref, calls_ref = run(0)
    loss, grads, calls = run(every)
    assert calls_ref == [1, 1, 1, 1]
    # Checkpointed blocks (0, every, 2*every, ...) run their forward again during backward.
    assert calls == [2 if i % every == 0 else 1 for i in range(4)]
    assert torch.equal(loss, loss_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-7, msg=name)


def test_init_scales_residual_projections():
    model = LLM(LLMConfig(vocab_size=1000, dim=256, n_layers=8, n_heads=4))
    std = lambda p: float(p.detach().std())  # noqa: E731
    assert std(model.layers[0].attention.wq.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].attention.wo.weight) == pytest.approx(0.02 / 4, rel=0.05)  # sqrt(2*8)
    assert std(model.layers[0].feed_forward.w2.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))
    plain = LLM(LLMConfig(vocab_size=1000, dim=256, n_layers=8, n_heads=4, init="normal"))
    assert std(plain.layers[0].attention.wo.weight) == pytest.approx(0.02, rel=0.05)


def test_meta_device_then_materialise():
    with torch.device("meta"):
        model = LLM(LLMConfig(**LLAMA))
    assert model.tok_embeddings.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 61, (1, 5)))).all()


def test_tied_embeddings_share_one_parameter():
    model = build("gpt2")
    assert model.output is None and model.head_weight is model.tok_embeddings.weight
    assert build("llama").head_weight is not build("llama").tok_embeddings.weight


BAD = [
    ({"n_heads": 5}, "n_heads"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"n_kv_heads": 0}, "n_kv_heads"),
    ({"mlp": "relu"}, "mlp"),
    ({"norm": "batchnorm"}, "norm"),
    ({"positions": "alibi"}, "positions"),
    ({"init": "xavier"}, "init"),
    ({"dropout": 1.0}, "dropout"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"dim": 32.0}, "dim"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ({"bias": 1}, "bias"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier"),
    ({"mlp_hidden": -4}, "mlp_hidden"),
    ({"activation_checkpointing": -1}, "activation_checkpointing"),
    ({"n_heads": 32}, "n_heads"),  # head_dim 1: odd, RoPE impossible
]


@pytest.mark.parametrize("override,key", BAD)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(UserError, match=rf"^{key}: "):
        LLMConfig(**{**LLAMA, **override})


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(UserError, match=r"cfg.yaml: n_layer: unknown key"):
        LLMConfig.from_dict({**LLAMA, "n_layer": 2}, source="cfg.yaml")
    partial = {k: v for k, v in LLAMA.items() if k != "dim"}
    with pytest.raises(UserError, match=r"cfg.yaml: dim: required key missing"):
        LLMConfig.from_dict(partial, source="cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: norm_eps: expected a number"):
        LLMConfig.from_dict({**LLAMA, "norm_eps": "tiny"}, source="cfg.yaml")
    assert LLMConfig.from_dict({**LLAMA, "norm_eps": "1e-6"}).norm_eps == 1e-6
