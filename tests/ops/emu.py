"""Builds the CPU emulation of megalm's CUDA kernels (megalm/ops/csrc/emu/): the kernels' own
sources compiled by g++ against csrc/emu/cuda_emu.h, loaded with ctypes."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "megalm" / "ops" / "csrc"


def build(entry: str, out_dir: Path, kernels: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile csrc/emu/<entry>.cpp and the kernel sources `kernels` (csrc/<name>.cu, each its own
    translation unit, as in the CUDA build) into one shared library."""
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "the emulation tests need a C++ compiler (g++) on PATH"
    lib = out_dir / f"{entry}.so"
    # -ftrivial-auto-var-init=pattern: an uninitialised local reads a fixed pattern, not whatever
    # an earlier test left on the reused coroutine stacks. -Wno-maybe-uninitialized: g++ cannot see that `w != nullptr` guards both the load and the
    # use of a weight. -fno-strict-aliasing: the kernels' 16-byte vector accesses reinterpret element arrays, which
    # CUDA allows; the CUDA headers of emu/include/ forward to the emulation.
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized",
                    "-fno-strict-aliasing",
                    "-ftrivial-auto-var-init=pattern", f"-I{CSRC / 'emu' / 'include'}", f"-I{CSRC}",
                    str(CSRC / "emu" / f"{entry}.cpp"), "-x", "c++", *(str(CSRC / f"{k}.cu") for k in kernels),
                    "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.megalm_emu_error.restype = ctypes.c_char_p
    return dll


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer the kernel must overwrite: NaN wherever it does not."""
    return torch.full_like(t, float("nan"))


class reversed_order:
    """Within the block: lanes and warps run in decreasing order (the emulation's second schedule)."""

    def __init__(self, lib: ctypes.CDLL, on: bool = True):
        self.lib, self.on = lib, on

    def __enter__(self):
        self.lib.megalm_emu_set_reverse(int(self.on))

    def __exit__(self, *exc):
        self.lib.megalm_emu_set_reverse(0)


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    if t is None:
        return ctypes.c_void_p(0)
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def check(lib: ctypes.CDLL, rc: int) -> None:
    assert rc == 0, lib.megalm_emu_error().decode()
