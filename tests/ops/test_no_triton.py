"""A tiny training step through every op and through megalm's LLM must never import triton (CPU
machines, no compiler).

The CPU .venv has no triton at all, so there the check proves nothing: it is run again with the
CUDA torch of .venv-cuda (`make cuda-venv`), which ships triton, after asserting that triton is
importable there. On this machine kind that interpreter has no GPU, so the ops take their CPU path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA_PY = REPO / ".venv-cuda" / "bin" / "python"

SCRIPT = r"""
import importlib.util
import sys
import torch

REPO = sys.argv[1]
BLOCKED = []  # (stack) of each attempt to import triton made on megalm's behalf
if sys.argv[2:] == ["--need-triton"]:
    # Without triton installed the checks below would pass whatever megalm does.
    assert importlib.util.find_spec("triton") is not None, "triton is not installed in " + sys.executable
    assert "triton" not in sys.modules, "imported before megalm: " + str(sorted(m for m in sys.modules if "triton" in m))
    import os
    import traceback

    class BlockTriton:
        # Every `import triton` fails here (availability probes via importlib.util.find_spec still
        # see it), so each later attempt is seen too, not only the first. CUDA torch itself tries
        # to import triton inside every torch.optim.Optimizer (the lazy `import torch._dynamo` of
        # torch/_compile.py) and copes with its absence: attempts through that path are torch's.
        # Any other attempt with megalm code on the stack (an `import triton`, torch.compile, ...)
        # is megalm's.
        def find_spec(self, name, path=None, target=None):
            if name != "triton" and not name.startswith("triton."):
                return None
            frame, importing = sys._getframe(1), False
            for _ in range(4):
                importing |= frame.f_code.co_name == "_find_and_load_unlocked"
                frame = frame.f_back
            if not importing:
                return None
            stack = [f for f in traceback.extract_stack() if not f.filename.startswith("<frozen")]
            ours = any(f.filename.startswith(os.path.join(REPO, "megalm") + os.sep) for f in stack)
            torchs = any(f.filename.endswith(os.path.join("torch", "_compile.py")) for f in stack)
            if ours and not torchs:
                BLOCKED.append("".join(traceback.format_list(stack[-12:])))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

    sys.meta_path.insert(0, BlockTriton())

import megalm
from megalm.models import LLM, LLMConfig
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

# The model the trainer builds (LMTask.build_model), both block flavours, packed documents.
doc_ids = torch.tensor([[0] * 5 + [1] * (T - 5)] * B)
for flavour in ({}, {"norm": "layernorm", "mlp": "gelu", "positions": "learned", "bias": True,
                     "tie_embeddings": True}):
    model = LLM(LLMConfig(vocab_size=V, dim=D, n_layers=2, n_heads=H, n_kv_heads=2, mlp_hidden=48,
                          max_seq_len=T, **flavour))
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model_losses = []
    for step in range(3):
        loss = model(ids[:, :-1], doc_ids=doc_ids, labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model_losses.append(loss.item())
    assert model_losses[-1] < model_losses[0], (flavour, model_losses)

assert not BLOCKED, "megalm tried to import triton:\n" + "\n".join(BLOCKED)
assert "triton" not in sys.modules, sorted(m for m in sys.modules if "triton" in m)
print("ok", losses)
"""


def _run(python: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([python, "-c", SCRIPT, str(REPO), *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout + r.stderr


def test_training_step_never_imports_triton():
    _run(sys.executable)


def test_training_step_never_imports_triton_where_triton_is_installed():
    if not CUDA_PY.exists():
        pytest.fail(".venv-cuda missing: `make test` creates it (make cuda-venv)")
    _run(str(CUDA_PY), "--need-triton")
