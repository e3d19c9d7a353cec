"""Which implementation an op runs: the CUDA kernel or the pure-PyTorch reference.

The choice is per call (`backend=` kwarg), defaulting to the `MEGALM_OPS` env var, defaulting to
"auto": the kernel for CUDA tensors (fp32/fp16/bf16) when a built extension matches the current
sources AND that kernel passed its self-test on this device (megalm.ops.selftest), else the
reference. Nothing here is process-wide mutable state except memoised loads and self-test results.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from megalm.errors import UserError

BACKENDS = ("auto", "reference", "cuda")
ENV_VAR = "MEGALM_OPS"


def resolve_backend(backend: str = "auto") -> str:
    """The effective backend name: the kwarg unless "auto", then the env var, then "auto"."""
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise UserError(f"{ENV_VAR}={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str, Path | None]:
    # Imported lazily: a CPU run never touches the build cache.
    from megalm.ops import build

    return build.load_extension()


def extension() -> ModuleType | None:
    """The loaded kernels module, or None when no build matches the current sources."""
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]


def build_dir() -> Path | None:
    """The cache directory of the loaded build (self-test records live there)."""
    return _load()[2]


def kernel_device(t: torch.Tensor) -> bool:
    """Whether a tensor lives where the kernels run (a seam for the CPU tests of dispatch)."""
    return t.is_cuda


@functools.lru_cache(maxsize=None)
def _warn_untrusted_once(kernel: str, detail: str) -> None:
    print(f"megalm.ops: warning: the {kernel} CUDA kernel failed its self-test on this device "
          f"({detail}); using the PyTorch reference for it", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=1)
def _warn_fallback_once(reason: str) -> None:
    # One line on stderr, once per process (warnings.warn would add a source line).
    print(f"megalm.ops: warning: CUDA kernels not available ({reason}); using PyTorch reference "
          "ops", file=sys.stderr, flush=True)


def use_cuda(backend: str, *tensors: torch.Tensor | None, kernel: str | None = None) -> bool:
    """True when this call should run the CUDA kernel; raises when "cuda" is forced but impossible.

    "cuda" runs the kernel unconditionally (that is how the self-tests call it); "auto" runs
    `kernel` only once it has passed its self-test on the tensors' device.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return False
    on_cuda = all(kernel_device(t) for t in tensors if t is not None)
    if backend == "cuda":
        if not on_cuda:
            raise UserError(f"backend='cuda' ({ENV_VAR}): the CUDA kernels need CUDA tensors, got "
                            f"{sorted({str(t.device) for t in tensors if t is not None})}")
        if extension() is None:
            raise UserError(f"backend='cuda' ({ENV_VAR}): CUDA kernels not available: "
                            f"{unavailable_reason()}; run `megalm ops build`")
        return True
    if not on_cuda:
        return False
    if any(t.dtype == torch.float64 for t in tensors if t is not None):
        return False  # kernels compute in fp32; float64 (tests, oracles) keeps the exact reference
    if extension() is None:
        _warn_fallback_once(unavailable_reason())
        return False
    if kernel is not None:
        # selftest runs the kernels, whose ops call this function: a module-level import is circular
        from megalm.ops import selftest

        device = next(t.device for t in tensors if t is not None)
        ok, detail = selftest.verdict(kernel, device)
        if not ok:
            _warn_untrusted_once(kernel, detail)
            return False
    return True


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for accumulation; fp32/fp64 stay as they are (fp64 oracles stay exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kernel_affine(x: torch.Tensor, *params: torch.Tensor | None) -> list[torch.Tensor | None]:
    """A norm's affine params as its kernels read them: as they are (contiguous) when they share
    fp32 or x's own dtype — a bf16 model's weights then cost no cast kernel per call — else in fp32."""
    dtypes = {p.dtype for p in params if p is not None}
    keep = len(dtypes) <= 1 and dtypes <= {torch.float32, x.dtype}
    return [None if p is None else (p if keep else p.float()).contiguous() for p in params]
