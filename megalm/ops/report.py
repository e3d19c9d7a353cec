"""`megalm ops report`: which implementation each op runs here, and what was built (like ds_report)."""

from __future__ import annotations

import os
import platform

import torch

from megalm.ops import _backend, build, selftest
from megalm.ops._backend import ENV_VAR, resolve_backend
from megalm.ops.registry import KERNELS

# Kept for callers that list the ops: name -> extension entry points.
OPS: dict[str, tuple[str, ...]] = {k.name: k.entry_points for k in KERNELS}

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
    ext, reason, where = None, "no CUDA device visible", None
    if has_gpu and backend != "reference":
        ext, reason, where = _backend.extension(), _backend.unavailable_reason(), _backend.build_dir()
    if backend == "reference":
        reason = f"{ENV_VAR}=reference"
    record = None
    if ext is not None:
        device = torch.device("cuda", torch.cuda.current_device())
        record = selftest.read_record(where, device)
        if record is None:  # what the first use would do anyway; the report shows the outcome
            record = selftest.run_all(device, where)
    arch = ";".join(builds[0][1]["archs"]) if builds else "-"
    lines.append("-" * 60)
    lines += kernel_table(ext, reason, record, has_gpu, arch, built_any=bool(builds))
    lines.append("CPU tensors always run the PyTorch reference.")
    return lines


def kernel_table(ext, reason: str, record: dict | None, has_gpu: bool, arch: str,
                 built_any: bool = True) -> list[str]:
    """Header + one row per registered kernel: built, arch, self-test verdict, path in use."""
    lines = [f"{'op':<28} {'built':<6} {'arch':<14} {'self-test':<10} path for CUDA tensors here"]
    for k in KERNELS:
        built = "yes" if built_any else "no"
        if ext is not None and not all(hasattr(ext, f) for f in k.entry_points):
            built = "no"
        res = (record or {}).get("kernels", {}).get(k.name)
        if res is None:
            test = "no GPU" if not has_gpu else "not run"
        else:
            test = "pass" if res["ok"] else "FAIL"
        if ext is None:
            path = f"reference ({reason})"
        elif built == "no":
            path = "reference (extension lacks " + ", ".join(
                f for f in k.entry_points if not hasattr(ext, f)) + ")"
        elif res is not None and not res["ok"]:
            path = f"reference (self-test failed: {res['detail']})"
        else:
            path = "cuda kernel"
        lines.append(f"{k.name:<28} {built:<6} {arch:<14} {test:<10} {path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    print("\n".join(report_lines()))
    return 0
