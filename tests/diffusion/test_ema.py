"""Sharded EMA: the update rule, shards that add up to the unsharded EMA, resharding on load."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from megalm.diffusion.ema import ShardedEMA, effective_decay, load_flat, shard_bounds


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_update_rule_with_warmup():
    assert effective_decay(0.999, 1) == pytest.approx(2 / 11)
    assert effective_decay(0.999, 10**6) == 0.999
    m = _model(0)
    w0 = _flat(m).clone()
    ema = ShardedEMA(m, 0.5, rank=0, world=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    d = effective_decay(0.5, 1)
    assert torch.allclose(ema.shard, d * w0 + (1 - d) * (w0 + 1))
    ema.updates = 100  # past the warm-up: plain decay
    before = ema.shard.clone()
    ema.update(m)
    assert torch.allclose(ema.shard, 0.5 * before + 0.5 * (w0 + 1))


def test_shards_concatenate_to_the_unsharded_ema_and_reshard():
    models = [_model(0) for _ in range(3)]
    full = ShardedEMA(models[0], 0.9, 0, 1)
    parts = [ShardedEMA(models[0], 0.9, r, 3) for r in range(3)]
    for step in range(5):
        with torch.no_grad():
            for p in models[0].parameters():
                p.mul_(0.7).add_(step)
        full.update(models[0])
        for e in parts:
            e.update(models[0])
    n = full.numel
    assert [e.shard.numel() for e in parts] == [b - a for a, b in (shard_bounds(n, r, 3) for r in range(3))]
    assert torch.equal(torch.cat([e.shard for e in parts]), full.shard)
    # Saved whole, loaded by a 2-rank layout: each rank takes its own slice.
    state = full.state_dict()
    two = [ShardedEMA(_model(1), 0.9, r, 2) for r in range(2)]
    for e in two:
        e.load_state_dict(state)
    assert torch.equal(torch.cat([e.shard for e in two]), full.shard) and two[1].updates == 5
    target = _model(2)
    load_flat(target, state["flat"])
    assert torch.equal(_flat(target), full.shard)


def test_load_refuses_another_models_ema():
    state = ShardedEMA(_model(0), 0.9, 0, 1).state_dict()
    with pytest.raises(ValueError, match="EMA state"):
        ShardedEMA(nn.Linear(4, 4), 0.9, 0, 1).load_state_dict(state)
