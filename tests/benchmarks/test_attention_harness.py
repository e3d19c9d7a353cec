"""benchmarks/attention.py measures the document-masked attention candidates on a GPU; `--smoke`
runs the harness on this CPU (what runs here is checked against the fp64 reference, what cannot
run says why), and the varlen offsets it hands FlashAttention match the document mask."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megalm.models.llm import document_mask
from tests.distributed.helper import REPO, cpu_env

pytestmark = pytest.mark.timeout(300)


def _bench():
    """benchmarks/attention.py as a module (benchmarks/ is scripts, not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location("attention_bench", os.path.join(REPO, "benchmarks", "attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "attention.py"), "--smoke", "--out",
                           str(out)], env=cpu_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["shapes"]["tiny"]["candidates"]
    assert set(rows) == {"causal", "sdpa_dense_mask", "sdpa_dense_mask_efficient", "varlen", "megalm_document_kernel"}
    assert rows["causal"]["ms"] > 0
    dense = rows["sdpa_dense_mask"]
    assert dense["materialises_txt_mask"] and dense["causal_ratio"] > 0
    assert max(dense["max_abs_error_vs_fp64"].values()) < 1e-5  # fp32 on the CPU
    assert rows["varlen"]["unavailable"]  # FlashAttention has no CPU kernel: said, not faked
    # On the CPU megalm's op runs its reference (the dense mask): exact, and labelled as dense.
    ours = rows["megalm_document_kernel"]
    assert ours["materialises_txt_mask"] and max(ours["max_abs_error_vs_fp64"].values()) < 1e-5


def test_varlen_offsets_describe_the_document_mask():
    bench = _bench()
    doc_ids = bench.doc_ids_for(3, 50, mean=8.0, seed=5)
    cu, longest = bench.cu_seqlens_of(doc_ids)
    mask = document_mask(doc_ids)[:, 0].reshape(3, 50, 50)
    # The block-diagonal causal mask the offsets stand for, over the flattened batch.
    flat = torch.zeros(150, 150, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        flat[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    for r in range(3):
        assert torch.equal(flat[r * 50:(r + 1) * 50, r * 50:(r + 1) * 50], mask[r])
    assert not flat[:50, 50:].any()  # rows never attend to each other
    assert cu[0] == 0 and cu[-1] == 150 and longest == int((cu[1:] - cu[:-1]).max())
