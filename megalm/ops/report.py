"""`megalm ops report`: which implementation each op runs here, and what was built (like ds_report)."""

from __future__ import annotations

import os
import platform

import torch

from megalm.ops import build
from megalm.ops._backend import ENV_VAR, resolve_backend

# op name -> the extension entry points it needs
OPS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "apply_rope": ("rope_fwd",),
    "swiglu": ("swiglu_fwd", "swiglu_bwd"),
    "cross_entropy": ("cross_entropy_fwd",),
    "fused_linear_cross_entropy": ("cross_entropy_fwd",),
    "adaln_layer_norm": ("adaln_fwd", "adaln_bwd"),
    "FusedAdamW": ("multi_tensor_adamw",),
}


def report_lines() -> list[str]:
    """The report as lines (pure: loads the extension only when a CUDA device is visible)."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    has_gpu = torch.version.cuda is not None and torch.cuda.is_available()
    lines = ["megalm ops report", "-" * 60]
    lines.append(f"python ............ {platform.python_version()}")
    lines.append(f"torch ............. {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")
    lines.append(f"nvcc .............. {build.nvcc_version(cuda_home) or 'not found'} ({cuda_home})")
    if has_gpu:
        cc = torch.cuda.get_device_capability()
        lines.append(f"gpu ............... {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]})")
    else:
        lines.append("gpu ............... none visible")
    try:
        backend = resolve_backend("auto")
    except Exception as exc:  # noqa: BLE001 — a bad env var is itself worth reporting
        backend = f"invalid ({exc})"
    lines.append(f"{ENV_VAR} ........ {os.environ.get(ENV_VAR, '(unset)')} -> {backend}")
    lines.append(f"MEGALM_OPS_JIT .... {os.environ.get('MEGALM_OPS_JIT', '(unset)')}")
    lines.append(f"cache ............. {build.cache_root()}")
    lines.append(f"sources hash ...... {build.source_hash()[:16]} (build key {build.build_key()})")
    builds = build.builds_for_current_sources()
    if builds:
        for d, info in builds:
            lines.append(f"built ............. {';'.join(info['archs'])} -> "
                         f"{', '.join(info.get('embedded', []))} (torch {info['torch']}, nvcc "
                         f"{info.get('nvcc')}) {d}")
    else:
        lines.append("built ............. nothing for these sources (run `megalm ops build`)")
    ext, reason = (None, "no CUDA device visible")
    if has_gpu and backend != "reference":
        from megalm.ops import _backend

        ext, reason = _backend.extension(), _backend.unavailable_reason()
    if backend == "reference":
        reason = f"{ENV_VAR}=reference"
    lines.append("-" * 60)
    lines.append(f"{'op':<28} path for CUDA tensors here")
    for op, fns in OPS.items():
        if ext is not None and all(hasattr(ext, f) for f in fns):
            path = "cuda kernel"
        elif ext is not None:
            path = "reference (extension lacks " + ", ".join(f for f in fns if not hasattr(ext, f)) + ")"
        else:
            path = f"reference ({reason})"
        lines.append(f"{op:<28} {path}")
    lines.append("CPU tensors always run the PyTorch reference.")
    return lines


def main(argv: list[str] | None = None) -> int:
    print("\n".join(report_lines()))
    return 0
