"""Peak dense FLOP/s per device, by GPU model and training dtype, for MFU.

Figures are the vendors' datasheet numbers *without* structured sparsity. fp32 training counts
TF32 tensor-core peak only when PyTorch lets matmuls use TF32. On a CPU, or a GPU missing here,
there is no peak (MFU is left blank and FLOP/s is shown); `logging.peak_flops` overrides all.
"""

from __future__ import annotations

import re

import torch

T = 1e12
# (pattern on torch.cuda.get_device_name(), name, {dtype: peak}); first match wins, so the more
# specific names come first (H100 PCIe before H100, L40S before L40 before L4, A100 before A10).
_TABLE: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H200", "H200", {"bf16": 989 * T, "fp16": 989 * T, "tf32": 494.7 * T, "fp32": 67 * T}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756 * T, "fp16": 756 * T, "tf32": 378 * T, "fp32": 51 * T}),
    (r"H100|GH200", "H100 SXM", {"bf16": 989 * T, "fp16": 989 * T, "tf32": 494.7 * T, "fp32": 67 * T}),
    (r"A100", "A100", {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}),
    (r"L40S", "L40S", {"bf16": 362 * T, "fp16": 362 * T, "tf32": 183 * T, "fp32": 91.6 * T}),
    (r"L40\b", "L40", {"bf16": 181 * T, "fp16": 181 * T, "tf32": 90.5 * T, "fp32": 90.5 * T}),
    (r"\bL4\b", "L4", {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T}),
    (r"\bA10\b", "A10", {"bf16": 125 * T, "fp16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T}),
    (r"V100", "V100", {"fp16": 125 * T, "fp32": 15.7 * T}),
)


def lookup(device_name: str, dtype: str, tf32: bool = False) -> tuple[str, float] | None:
    """(model, peak FLOP/s) for a CUDA device name and a training dtype (bf16|fp16|fp32)."""
    key = "tf32" if dtype == "fp32" and tf32 else dtype
    for pattern, model, peaks in _TABLE:
        if re.search(pattern, device_name):
            return (model, peaks[key]) if key in peaks else None
    return None


def peak_flops(dtype: str, override: float = 0.0) -> float | None:
    """This process's device peak for `dtype`: the override when set, else the table; None on
    a CPU or an unknown GPU."""
    if override:
        return override

    if not torch.cuda.is_available():
        return None
    found = lookup(torch.cuda.get_device_name(), dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
    return found[1] if found else None
