"""Log line, strict-JSON metrics and the peak FLOP/s table behind MFU."""

from __future__ import annotations

import json
import math

import pytest

from megalm.train.metrics import format_line, json_safe
from megalm.train.peak_flops import lookup, peak_flops


def test_json_safe_turns_nan_and_inf_into_null():
    value = {"loss": float("nan"), "x": [1.0, float("inf")], "n": 3, "s": "a"}
    assert json.dumps(json_safe(value), allow_nan=False) == '{"loss": null, "x": [1.0, null], "n": 3, "s": "a"}'


@pytest.mark.parametrize("name, dtype, tf32, model, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, "H100 SXM", 989),
    ("NVIDIA H100 PCIe", "bf16", False, "H100 PCIe", 756),
    ("NVIDIA H200", "bf16", False, "H200", 989),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, "A100", 312),
    ("NVIDIA A100-PCIE-40GB", "fp32", True, "A100", 156),
    ("NVIDIA A100-SXM4-40GB", "fp32", False, "A100", 19.5),
    ("NVIDIA L40S", "bf16", False, "L40S", 362),
    ("NVIDIA L4", "fp16", False, "L4", 121),
    ("NVIDIA A10", "bf16", False, "A10", 125),
    ("Tesla V100-SXM2-32GB", "fp16", False, "V100", 125),
])
def test_peak_table_by_model_and_dtype(name, dtype, tf32, model, tflops):
    assert lookup(name, dtype, tf32) == (model, pytest.approx(tflops * 1e12))


def test_no_peak_for_unknown_gpus_or_missing_dtypes_and_override_wins():
    assert lookup("NVIDIA GeForce GTX 1080", "bf16") is None
    assert lookup("Tesla V100-SXM2-32GB", "bf16") is None  # V100 has no bf16 tensor cores
    assert peak_flops("bf16", override=123e12) == 123e12


def test_no_mfu_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops("bf16") is None


def test_log_line_shows_mfu_when_known_else_flops():
    m = {"step": 3, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1234.0, "flops_per_s": 2e12,
         "mfu": 0.41, "memory_gib": 1.5, "eta_s": 3725.0, "skipped_steps": 0}
    line = format_line(m, 10)
    assert line.startswith("step 3/10 | loss 2.5000 | lr 1.00e-04 | gnorm 0.500 | tok/s 1,234 | MFU 41.0%")
    assert "eta 1:02:05" in line and math.isfinite(m["eta_s"])
    assert "MFU" not in format_line({**m, "mfu": None}, 10)
