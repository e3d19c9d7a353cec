"""A tiny training step through every op must never import triton (CPU machines, no compiler)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
import torch
import megalm
from megalm.ops import (FusedAdamW, adaln_layer_norm, apply_rope, fused_linear_cross_entropy,
                        layer_norm, rms_norm, rope_cos_sin, swiglu)

torch.manual_seed(0)
V, D, B, T, H = 64, 32, 2, 8, 4
emb = torch.nn.Parameter(torch.randn(V, D) * 0.1)
wq = torch.nn.Parameter(torch.randn(D, D) * 0.1)
w_gate = torch.nn.Parameter(torch.randn(D, 2 * D) * 0.1)
w_up = torch.nn.Parameter(torch.randn(D, 2 * D) * 0.1)
w_down = torch.nn.Parameter(torch.randn(2 * D, D) * 0.1)
norm_w = torch.nn.Parameter(torch.ones(D))
ada = torch.nn.Parameter(torch.zeros(B, 2 * D))
params = [emb, wq, w_gate, w_up, w_down, norm_w, ada]
opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1)
ids = torch.randint(0, V, (B, T + 1))
losses = []
for step in range(3):
    x = emb[ids[:, :-1]]
    h = rms_norm(x, norm_w)
    q = (h @ wq).view(B, T, H, D // H)
    cos, sin = rope_cos_sin(torch.arange(T), D // H)
    q, k = apply_rope(q, q, cos, sin)
    x = x + (q * k).view(B, T, D)
    h = adaln_layer_norm(layer_norm(x, None, None), ada[:, :D], ada[:, D:])
    x = x + swiglu(h @ w_gate, h @ w_up) @ w_down
    loss = fused_linear_cross_entropy(x, emb, ids[:, 1:], chunk_size=5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert all(torch.isfinite(torch.tensor(losses))), losses
assert losses[-1] < losses[0], losses
assert "triton" not in sys.modules, sorted(m for m in sys.modules if "triton" in m)
print("ok", losses)
"""


def test_training_step_never_imports_triton():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
