"""Self-test before trust: every kernel is run against its reference on small shapes that hit the
hard cases, once per build and device, before `auto` dispatch may use it.

The verdicts are recorded next to the build (`<build dir>/selftest/<device>.json`, written
atomically), so a process reuses what an earlier one (or `megalm ops build`) found. A kernel that
failed falls back to the reference with one warning naming it; "cuda" still forces it.

Accuracy rule (shared with gpu_tests/): against a float64 oracle, the kernel's error in a dtype
must stay within 2x the error of the PyTorch reference in that same dtype, plus a small floor.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megalm.fsio import atomic_write
from megalm.ops import _backend

# Absolute floor relative to the oracle's magnitude: summation order alone moves results.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5, torch.float64: 1e-12}


@dataclass(frozen=True)
class Case:
    """One self-test: `run()` raises AssertionError (or a kernel error) when the kernel is wrong."""
    name: str
    run: Callable[[], None]


@dataclass(frozen=True)
class Kernel:
    """A fused op: the extension entry points it needs and where its self-test cases live.

    `module` defines `selftest_cases(device: torch.device) -> list[Case]`.
    """
    name: str
    entry_points: tuple[str, ...]
    module: str

    def cases(self, device: torch.device) -> list[Case]:
        return importlib.import_module(self.module).selftest_cases(device)


def _err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    return (a.double() - oracle).abs().max().item() if a.numel() else 0.0


def assert_as_good_as_eager(kernel: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor,
                            dtype: torch.dtype, what: str) -> None:
    assert kernel.dtype == eager.dtype, f"{what}: dtype {kernel.dtype} vs {eager.dtype}"
    assert kernel.shape == eager.shape, f"{what}: shape {tuple(kernel.shape)} vs {tuple(eager.shape)}"
    assert bool(torch.isfinite(kernel).all()) == bool(torch.isfinite(eager).all()), \
        f"{what}: non-finite values"
    ek, ee = _err(kernel, oracle), _err(eager, oracle)
    floor = FLOOR[dtype] * max(1.0, oracle.abs().max().item() if oracle.numel() else 0.0)
    assert ek <= 2 * ee + floor, f"{what}: kernel err {ek:.3e} vs eager {ee:.3e} ({dtype})"


def run_three(fn: Callable, inputs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
              grad: bool = True) -> dict:
    """fn(*tensors, backend=...) as kernel in dtype, reference in dtype, reference in fp64."""
    outs = {}
    for mode, dt, backend in [("kernel", dtype, "cuda"), ("eager", dtype, "reference"),
                              ("oracle", torch.float64, "reference")]:
        xs = [t.detach().to(device=device, dtype=dt if t.is_floating_point() else t.dtype)
              .requires_grad_(grad and t.is_floating_point()) for t in inputs]
        y = fn(*xs, backend=backend)
        y = y if isinstance(y, tuple) else (y,)
        if grad:
            g = torch.Generator(device=device).manual_seed(7)
            dys = [torch.randn(o.shape, generator=g, device=device, dtype=torch.float64).to(o.dtype)
                   for o in y]
            torch.autograd.backward(y, dys)
        outs[mode] = ([o.detach() for o in y], [x.grad for x in xs if x.grad is not None])
    return outs


def compare(fn: Callable, inputs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
            what: str, grad: bool = True) -> None:
    """The accuracy rule over every output and every input gradient."""
    outs = run_three(fn, inputs, dtype, device, grad)
    for kind, label in ((0, "out"), (1, "grad")):
        k, e, o = outs["kernel"][kind], outs["eager"][kind], outs["oracle"][kind]
        assert len(k) == len(e) == len(o), f"{what}: {len(k)} {label}s vs {len(e)}"
        for i, (a, b, c) in enumerate(zip(k, e, o)):
            assert_as_good_as_eager(a, b, c, dtype, f"{what} {label}[{i}]")


def randn(*shape: int, device: torch.device, seed: int, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    """fp64 normal samples from a private generator: self-tests never touch the global RNG."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float64) * scale + shift


def registry() -> tuple[Kernel, ...]:
    # the registry imports every op, and each op's dispatch imports this module: import on use
    from megalm.ops.registry import KERNELS

    return KERNELS


def run_kernel(kernel: Kernel, device: torch.device) -> dict:
    """Run one kernel's cases; {"ok", "detail", "cases", "seconds"}; never raises for a wrong kernel."""
    start = time.monotonic()
    ext = _backend.extension()
    missing = [f for f in kernel.entry_points if not hasattr(ext, f)]
    if missing:
        return {"ok": False, "detail": f"extension lacks {', '.join(missing)}", "cases": 0,
                "seconds": 0.0}
    cases = kernel.cases(device)
    for case in cases:
        try:
            run_case(case, device)
        except Exception as exc:  # noqa: BLE001 — any failure (a stale binding too) means untrusted
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"ok": False, "detail": f"{case.name}: {last}"[:500], "cases": len(cases),
                    "seconds": round(time.monotonic() - start, 3)}
    return {"ok": True, "detail": f"{len(cases)} cases passed", "cases": len(cases),
            "seconds": round(time.monotonic() - start, 3)}


def run_case(case: Case, device: torch.device) -> None:
    """Run one case whatever the caller's grad/autocast mode; raise if the kernel is wrong."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        case.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # surface asynchronous kernel faults here


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        name = f"{torch.cuda.get_device_name(idx)}-sm{cc[0]}{cc[1]}"
    else:
        name = device.type
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def record_path(build_dir: Path, device: torch.device) -> Path:
    return build_dir / "selftest" / f"{device_tag(device)}.json"


def read_record(build_dir: Path | None, device: torch.device) -> dict | None:
    if build_dir is None:
        return None
    path = record_path(build_dir, device)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_all(device: torch.device, build_dir: Path | None) -> dict:
    """Self-test every registered kernel on `device`; record the verdicts next to the build."""
    results = {k.name: run_kernel(k, device) for k in registry()}
    record = {"device": device_tag(device), "torch": torch.__version__,
              "tested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernels": results}
    if build_dir is not None:
        path = record_path(build_dir, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(record, indent=2, sort_keys=True))
        except OSError as exc:  # a read-only shared cache: the verdicts still hold in this process
            print(f"megalm.ops: note: cannot record self-test results in {path}: {exc}",
                  file=sys.stderr, flush=True)
    return record


@functools.lru_cache(maxsize=None)
def _verdicts(build_dir: Path | None, tag: str, device: torch.device) -> dict:
    record = read_record(build_dir, device)
    names = {k.name for k in registry()}
    if record is None or not names <= set(record.get("kernels", {})):
        record = run_all(device, build_dir)
    return record["kernels"]


def verdict(kernel: str, device: torch.device) -> tuple[bool, str]:
    """(passed, detail) for `kernel` on `device`, self-testing everything on first need."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    res = _verdicts(_backend.build_dir(), device_tag(device), device).get(kernel)
    if res is None:
        return False, f"no self-test registered for {kernel!r}"
    return bool(res["ok"]), str(res["detail"])
