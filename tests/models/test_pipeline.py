"""The pipeline layer list is the same model: same parameters, same numbers, same gradients."""

from __future__ import annotations

import pytest
import torch

from megalm.models.pipeline import BlockPipe, EmbeddingPipe, HeadPipe, pipeline_layers, pipeline_loss
from tests.models.common import build, packed_batch


def run_layers(layers, inputs):
    x = inputs
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("shape", ["llama", "gpt2", "mqa"])
def test_layers_run_in_order_equal_forward_exactly(shape):
    model = build(shape, dtype=torch.float32)
    layers = pipeline_layers(model)
    assert [type(m) for m in layers] == [EmbeddingPipe, BlockPipe, BlockPipe, HeadPipe]
    ids, pos, docs, _ = packed_batch([3, 8, 5])
    ids2 = torch.cat([ids, ids.flip(1)])
    pos2, docs2 = torch.cat([pos, pos.flip(1)]), torch.cat([docs, docs.flip(1)])
    assert torch.equal(run_layers(layers, (ids2, pos2, docs2)), model(ids2, pos2, docs2))
    assert torch.equal(run_layers(layers, (ids2, pos2)), model(ids2, pos2))
    assert torch.equal(run_layers(layers, ids2), model(ids2))


@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_layers_share_the_models_parameters_and_gradients(shape, fused_loss):
    model = build(shape, dtype=torch.float64, activation_checkpointing=1)
    layers = pipeline_layers(model, fused_loss=fused_loss)
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    assert layer_params == {id(p) for p in model.parameters()}

    ids, pos, docs, labels = packed_batch([6, 9])
    model.train()
    expected_loss = model(ids, pos, docs, labels=labels)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    outputs = run_layers(layers, (ids, pos, docs))
    assert outputs.shape == (1, 15, 32 if fused_loss else 61)
    loss = layers[-1].loss(outputs, labels)
    if fused_loss:  # the same op on the same numbers
        assert torch.equal(loss, expected_loss)
    else:
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(pipeline_loss(outputs, labels), expected_loss, rtol=1e-10, atol=0)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-7, atol=1e-12, msg=name)


def test_tied_head_is_the_embedding_and_separate_when_untied():
    tied = build("gpt2")
    layers = pipeline_layers(tied)
    assert layers[-1].tied and layers[-1].proj is layers[0].tok_embeddings
    untied = pipeline_layers(build("llama"))
    assert not untied[-1].tied and untied[-1].proj.weight is not untied[0].tok_embeddings.weight
