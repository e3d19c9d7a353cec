"""Recipe options (QK-norm, ReLU², zero-init projections, logit soft-cap, value embeddings) against
the explicit float64 implementation, plus what each promises beyond the forward: parameters, init,
bounds."""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from megalm.models.pipeline import pipeline_layers
from tests.models.common import LLAMA, build, packed_batch
from tests.models.naive import naive_logits, naive_loss

TOL = dict(rtol=1e-9, atol=1e-10)
# Learned positions: RoPE's inverse frequencies are fp32 by design (megalm.ops.rope), which QK-norm's
# unit-scale q/k turn into ~1e-10 differences against the fp64 naive rotation; the options under
# test are independent of the position scheme.
BASE = {**LLAMA, "positions": "learned"}
OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=0.3),
    # 5 layers, 2 tables: layers 0, 1 and 3, 4 mix them in, layer 2 has none.
    "value_embeds": dict(value_embeds=2, n_layers=5),
    "all": dict(qk_norm=True, mlp="relu2", logit_softcap=0.3, zero_init_proj=True, value_embeds=1),
}
# Each option's model with the option off; the same weights load into it (minus QK-norm's).
WITHOUT = {"qk_norm": dict(qk_norm=False), "relu2": dict(mlp="gelu"), "softcap": dict(logit_softcap=None),
           "value_embeds": dict(value_embeds=0),
           "all": dict(qk_norm=False, mlp="gelu", logit_softcap=None, value_embeds=0)}


def _noisy(model: LLM, scale: float = 0.1) -> LLM:
    """Larger random weights (zero-init ones too), so the cap, the norms and the ReLU² all act on
    non-trivial values (logits reach ~2, well past the 0.3 cap)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_matches_naive_implementation(option):
    model = _noisy(build("llama", **{**BASE, **OPTIONS[option]}))
    ids, pos, docs, labels = packed_batch([5, 7])
    logits = model(ids, pos, docs)
    expected = naive_logits(model, ids, pos, docs)
    torch.testing.assert_close(logits, expected, **TOL)
    torch.testing.assert_close(model(ids, pos, docs, labels=labels), naive_loss(expected, labels), **TOL)
    # Sensitivity: the same weights without the option give other logits.
    plain = build("llama", **{**BASE, **OPTIONS[option], **WITHOUT[option]})
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(plain(ids, pos, docs), logits, rtol=1e-3, atol=1e-3)


def test_softcap_bounds_logits_and_is_tanh():
    model = _noisy(build("llama", logit_softcap=0.3))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    assert model.num_params() == build("llama").num_params()
    logits = model(ids)
    assert logits.abs().max() < 0.3
    uncapped = build("llama")
    uncapped.load_state_dict(model.state_dict())
    raw = uncapped(ids)
    assert raw.abs().max() > 0.3  # the cap really bends these logits
    torch.testing.assert_close(logits, 0.3 * torch.tanh(raw / 0.3), **TOL)


def test_qk_norm_parameters_and_default_counts():
    base, normed = build("llama"), build("llama", qk_norm=True)
    per_layer = 2 * LLAMA["dim"] // LLAMA["n_heads"]
    assert normed.num_params() - base.num_params() == LLAMA["n_layers"] * per_layer
    assert normed.layers[0].attention.q_norm.shape == (8,)
    fresh = LLM(LLMConfig(**LLAMA, qk_norm=True))
    assert torch.equal(fresh.layers[1].attention.k_norm, torch.ones(8))
    # Invariance QK-norm promises: scaling wq and wk leaves the output unchanged (up to eps,
    # so a tiny one here).
    normed = build("llama", qk_norm=True, norm_eps=1e-12)
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(3))
    before = normed(ids)
    with torch.no_grad():
        for block in normed.layers:
            block.attention.wq.weight.mul_(7.0)
            block.attention.wk.weight.mul_(0.2)
    torch.testing.assert_close(normed(ids), before, rtol=1e-8, atol=1e-10)
    plain = build("llama", norm_eps=1e-12)
    plain_before = plain(ids)
    with torch.no_grad():
        plain.layers[0].attention.wq.weight.mul_(7.0)
    assert not torch.allclose(plain(ids), plain_before, rtol=1e-3, atol=1e-3)  # without it, it would not


def test_relu2_width_and_params():
    cfg = LLMConfig(**{**LLAMA, "mlp": "relu2", "multiple_of": 1})
    assert cfg.ffn_hidden == 4 * LLAMA["dim"]
    assert build("llama", mlp="relu2").layers[0].feed_forward.w3 is None


def test_zero_init_projections_start_as_identity_blocks_and_still_learn():
    torch.manual_seed(0)
    model = LLM(LLMConfig(**LLAMA, zero_init_proj=True)).to(torch.float64)
    for block in model.layers:
        assert not block.attention.wo.weight.any() and not block.feed_forward.w2.weight.any()
        assert block.attention.wq.weight.std() > 0.01  # only the output projections are zeroed
    ids, pos, docs, labels = packed_batch([6, 4])
    h = model.tok_embeddings(ids)
    expected = torch.nn.functional.linear(model.norm(h), model.head_weight)
    torch.testing.assert_close(model(ids, pos, docs), expected, **TOL)
    model(ids, pos, docs, labels=labels).backward()
    for block in model.layers:
        assert block.attention.wo.weight.grad.abs().sum() > 0
        assert block.feed_forward.w2.weight.grad.abs().sum() > 0
    # Default off: the normal scaled init stays.
    assert build("llama").layers[0].attention.wo.weight.any()


@pytest.mark.parametrize("fused_loss", [False, True])
def test_pipeline_layers_apply_the_cap(fused_loss):
    model = _noisy(build("llama", logit_softcap=0.3))
    layers = pipeline_layers(model, fused_loss=fused_loss)
    ids, pos, docs, labels = packed_batch([6, 9])
    x = (ids, pos, docs)
    for layer in layers:
        x = layer(x)
    torch.testing.assert_close(layers[-1].loss(x, labels), model(ids, pos, docs, labels=labels), **TOL)


def test_value_embeddings_parameters_sharing_and_layers():
    base, ve = build("llama", n_layers=5), build("llama", n_layers=5, value_embeds=2)
    kv_dim = LLAMA["n_kv_heads"] * LLAMA["dim"] // LLAMA["n_heads"]
    # Two [V, kv_dim] tables plus two mixing weights in each of the 4 layers that use one.
    assert ve.num_params() - base.num_params() == 2 * LLAMA["vocab_size"] * kv_dim + 4 * 2
    assert [b.attention.ve_lambdas is not None for b in ve.layers] == [True, True, False, True, True]
    assert torch.equal(LLM(LLMConfig(**{**LLAMA, "value_embeds": 1})).layers[0].attention.ve_lambdas,
                       torch.tensor([0.5, 0.5]))
    # Lookups cost no FLOPs: the same count as without the tables.
    assert ve.flops_per_token(16) == base.flops_per_token(16) + 4 * 2 * 6
    # A table is shared by a first and a last layer: both send it gradient.
    ids, pos, docs, labels = packed_batch([6, 5])
    ve(ids, pos, docs, labels=labels).backward()
    grads = {}
    for layer in (0, 3):  # both read table 0; zeroing one layer's mix drops its share
        probe = build("llama", n_layers=5, value_embeds=2)
        with torch.no_grad():
            probe.layers[layer].attention.ve_lambdas[1] = 0.0
        probe(ids, pos, docs, labels=labels).backward()
        grads[layer] = probe.value_embeddings[0].weight.grad
    full = ve.value_embeddings[0].weight.grad
    assert full.abs().sum() > 0
    assert not torch.allclose(grads[0], full) and not torch.allclose(grads[3], full)
    assert not ve.value_embeddings[1].weight.grad[ids.unique()].eq(0).all()


def test_value_embeddings_in_kv_cache_generation():
    model = _noisy(build("llama", n_layers=3, value_embeds=1)).eval()
    prompt = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    idx = prompt
    for _ in range(8):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_value_embeddings_go_to_adamw_and_refuse_the_pipeline():
    from megalm.train.muon import hidden_matrices

    model = build("llama", value_embeds=1)
    hidden = hidden_matrices(model)
    assert all(id(p) not in hidden for p in model.value_embeddings.parameters())
    assert all(id(b.attention.ve_lambdas) not in hidden for b in model.layers)
    with pytest.raises(UserError, match="model.value_embeds: not supported with parallel.pipeline_stages"):
        pipeline_layers(model)


@pytest.mark.parametrize("key, value, expected", [
    ("logit_softcap", -1.0, "logit_softcap: expected a positive number"),
    ("logit_softcap", "big", "logit_softcap: expected a number"),
    ("qk_norm", "yes", "qk_norm: expected true or false"),
    ("zero_init_proj", 1, "zero_init_proj: expected true or false"),
    ("mlp", "relu3", "mlp: expected one of swiglu, gelu, relu2"),
    ("value_embeds", 2, "value_embeds: each table feeds one of the first and one of the last layers, so at most "
                        "n_layers / 2 = 1, got 2"),
    ("value_embeds", -1, "value_embeds: expected an integer >= 0"),
])
def test_bad_option_values_name_the_key(key, value, expected):
    with pytest.raises(UserError, match=expected):
        LLMConfig.from_dict({**LLAMA, key: value}, source="m.yaml")
