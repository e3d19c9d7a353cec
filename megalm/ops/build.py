"""Ahead-of-time build of the fused ops into ONE extension, cached by what determines the binary.

Cache layout (root: $MEGALM_OPS_CACHE or ~/.cache/megalm/ops):
    <key>/<arch-tag>/megalm_ops_C.so + build.json + selftest/<device>.json
where key = hash(csrc sources, torch version, torch CUDA version, Python ABI tag, compiler flags)
and arch-tag names the arch list (e.g. sm80-sm90ptx). A build happens in a temp dir under a file
lock (ranks sharing a cache compile once) and is renamed into place complete, with build.json
written last; a directory without build.json is never loaded.

A build covers a GPU of compute capability X.Y when it holds SASS for X.Z with Z <= Y (CUDA runs
sm_80 code on sm_86/sm_89) or PTX for an arch <= X.Y (the driver JITs it); "a" targets (9.0a)
run only on their exact arch.

`python -m megalm.ops.build [--arch "8.0;9.0"]` works with only torch installed (CI compile check).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.fsio import atomic_write, fsync_dir
from megalm.ops import _backend, selftest

EXT_NAME = "megalm_ops_C"
DEFAULT_ARCH = "8.0;9.0+PTX"
EXTRA_CFLAGS = ("-O3",)
EXTRA_CUDA_CFLAGS = ("-O3", "--expt-relaxed-constexpr")
CSRC = Path(__file__).resolve().parent / "csrc"
_ARCH_RE = re.compile(r"^\d+\.\d+a?(\+PTX)?$")
FATBIN_MAGIC = 0xBA55ED50


def source_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh"))


def compiled_sources() -> list[Path]:
    return [p for p in source_files() if p.suffix in (".cu", ".cpp")]


def source_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cache_root() -> Path:
    env = os.environ.get("MEGALM_OPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megalm" / "ops"


def build_key() -> str:
    abi = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag
    flags = " ".join(EXTRA_CFLAGS) + "|" + " ".join(EXTRA_CUDA_CFLAGS)
    h = hashlib.sha256(f"{source_hash()}|torch={torch.__version__}|cuda={torch.version.cuda}|"
                       f"abi={abi}|flags={flags}".encode())
    return h.hexdigest()[:16]


def parse_arch(arch: str) -> list[str]:
    items = [a.strip() for a in arch.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    bad = [a for a in items if not _ARCH_RE.match(a)]
    if not items or bad:
        raise UserError(f"--arch / TORCH_CUDA_ARCH_LIST={arch!r}: expected e.g. \"8.0;9.0\" "
                        f"(major.minor[+PTX] separated by ';'), bad: {bad or 'empty'}")
    return sorted(set(items), key=lambda a: float(a.split("+")[0].rstrip("a")))


def arch_tag(archs: list[str]) -> str:
    return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)


def nvcc_version(cuda_home: str | None) -> str | None:
    nvcc = Path(cuda_home or "/usr/local/cuda") / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else None


def fatbin_archs(so_path: Path) -> list[str]:
    """The SASS ("sm_80") and PTX ("compute_90") targets embedded in a binary's fat binaries.

    Reads the fatbin container headers directly, so no cuobjdump is needed: each container
    (magic 0xBA55ED50) holds entries whose header has kind (1 = PTX, 2 = ELF) and the arch.
    """
    data = so_path.read_bytes()
    found: set[str] = set()
    pos = data.find(struct.pack("<I", FATBIN_MAGIC))
    while pos != -1:
        if pos + 16 <= len(data):
            _, _, hdr_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
            entry, end = pos + hdr_size, pos + hdr_size + fat_size
            while entry + 32 <= min(end, len(data)):
                kind, _, ehdr, payload = struct.unpack_from("<HHIQ", data, entry)
                arch = struct.unpack_from("<I", data, entry + 28)[0]
                if kind not in (1, 2) or ehdr < 32 or not 10 <= arch <= 2000:
                    break
                found.add(("compute_" if kind == 1 else "sm_") + str(arch))
                entry += ehdr + payload
        pos = data.find(struct.pack("<I", FATBIN_MAGIC), pos + 4)
    return sorted(found)


def build(arch: str | None = None, verbose: bool = False) -> Path:
    """Compile (unless cached) and return the build dir holding the .so and build.json."""
    archs = parse_arch(arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH)
    if torch.version.cuda is None:
        raise UserError(f"torch {torch.__version__} is a CPU-only build: it cannot compile CUDA ops;"
                        " use a CUDA build of torch (e.g. `make cuda-venv` → .venv-cuda)")
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    if not cuda_home or not (Path(cuda_home) / "bin" / "nvcc").exists():
        raise UserError(f"CUDA_HOME={cuda_home!r}: no bin/nvcc there; set CUDA_HOME to the CUDA toolkit")
    final = cache_root() / build_key() / arch_tag(archs)
    if _complete(final):
        print(f"megalm ops: up to date: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One compiler per build across processes (every rank of a job may get here at once): the
    # others wait on the lock and then find the finished build.
    with open(final.parent / f".lock-{final.name}", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(final):
                print(f"megalm ops: up to date (built by another process): {final}")
                return final
            return _compile(archs, final, cuda_home, verbose)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(d: Path) -> bool:
    return (d / "build.json").exists() and (d / f"{EXT_NAME}.so").exists()


def _compile(archs: list[str], final: Path, cuda_home: str, verbose: bool) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    # nvcc takes 1-2 GB per job: use the cores, but at most 8 jobs.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 8))))
    os.environ.setdefault("CUDA_HOME", cuda_home)
    print(f"megalm ops: compiling {len(compiled_sources())} sources for {';'.join(archs)} "
          f"into {final} (MAX_JOBS={os.environ['MAX_JOBS']}) ...", flush=True)
    start = time.monotonic()
    try:
        cpp_extension.load(
            name=EXT_NAME,
            sources=[str(p) for p in compiled_sources()],
            build_directory=str(tmp),
            extra_cflags=list(EXTRA_CFLAGS),
            extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS),
            verbose=verbose,
            is_python_module=True,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half build behind
        raise
    for obj in tmp.glob("*.o"):
        obj.unlink()  # intermediates: the key changes whenever a source does, so never reused
    so = tmp / f"{EXT_NAME}.so"
    info = {
        "archs": archs,
        "embedded": fatbin_archs(so),
        "source_hash": source_hash(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": nvcc_version(cuda_home),
        "seconds": round(time.monotonic() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for f in tmp.iterdir():  # the .so must be on disk before the rename publishes it
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    atomic_write(tmp / "build.json", json.dumps(info, indent=2, sort_keys=True))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same build first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(final.parent)
    print(f"megalm ops: built in {info['seconds']} s: {final} ({', '.join(info['embedded'])})")
    return final


def builds_for_current_sources() -> list[tuple[Path, dict]]:
    """Complete builds (dir, build.json) matching the current sources, torch and CUDA."""
    base = cache_root() / build_key()
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            meta = d / "build.json"
            if not d.name.startswith(".") and meta.exists() and (d / f"{EXT_NAME}.so").exists():
                out.append((d, json.loads(meta.read_text())))
    return out


def _covers(info: dict, major: int, minor: int) -> bool:
    for a in info.get("archs", []):
        num = a.split("+")[0]
        specific = num.endswith("a")  # sm_90a code runs on sm_90 only
        am, an = (int(x) for x in num.rstrip("a").split("."))
        if (am, an) == (major, minor):
            return True
        if not specific and am == major and an <= minor:
            return True  # SASS is compatible across minor versions upwards
        if a.endswith("+PTX") and (am, an) <= (major, minor):
            return True
    return False


def load_extension() -> tuple[ModuleType | None, str, Path | None]:
    """(module, "", build dir) when a build covering this GPU exists (or MEGALM_OPS_JIT=1 builds
    one), else (None, why, None)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build", None
    if not torch.cuda.is_available():
        return None, "no CUDA device visible", None
    cc = torch.cuda.get_device_capability()
    builds = [(d, i) for d, i in builds_for_current_sources() if _covers(i, *cc)]
    if not builds and os.environ.get("MEGALM_OPS_JIT", "") == "1":
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{cc[0]}.{cc[1]}"
        try:
            d = build(arch)
        except Exception as exc:  # noqa: BLE001 — report why, fall back to the reference
            return None, f"JIT build failed: {exc}", None
        info = json.loads((d / "build.json").read_text())
        if not _covers(info, *cc):  # e.g. TORCH_CUDA_ARCH_LIST names another GPU
            return None, (f"JIT build for {';'.join(info['archs'])} does not cover "
                          f"sm_{cc[0]}{cc[1]}"), None
        builds = [(d, info)]
    if not builds:
        return None, (f"no build for these sources and sm_{cc[0]}{cc[1]} under {cache_root()} "
                      "(run `megalm ops build`, or set MEGALM_OPS_JIT=1)"), None
    so = builds[0][0] / f"{EXT_NAME}.so"
    if EXT_NAME in sys.modules:
        return sys.modules[EXT_NAME], "", builds[0][0]
    try:
        loader = importlib.machinery.ExtensionFileLoader(EXT_NAME, str(so))
        spec = importlib.util.spec_from_file_location(EXT_NAME, str(so), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return None, f"cannot load {so}: {exc}", None
    sys.modules[EXT_NAME] = module
    return module, "", builds[0][0]


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="megalm ops build",
                                 description="compile the fused CUDA ops ahead of time (cached)")
    ap.add_argument("--arch", default=None,
                    help=f"CUDA arch list, default $TORCH_CUDA_ARCH_LIST or {DEFAULT_ARCH!r}")
    ap.add_argument("--jit", action="store_true",
                    help="build only for the visible GPU's arch (what MEGALM_OPS_JIT=1 does)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show compiler commands")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a kernel fails its self-test on the visible GPU (CI use)")
    args = ap.parse_args(argv)
    arch = args.arch
    if args.jit and arch is None:
        if not torch.cuda.is_available():
            raise UserError("--jit: builds for the visible GPU, but no CUDA device is visible; "
                            "pass --arch instead")
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    d = build(arch, verbose=args.verbose)
    ok = _selftest_here()
    print(d)  # last line: the build dir (scripts read it)
    return 1 if args.strict and not ok else 0


def _selftest_here() -> bool:
    """On a GPU, self-test every kernel now so the first training step does not have to.

    False when a kernel failed, or when there was a GPU but the build could not be loaded."""
    if not torch.cuda.is_available():
        print("megalm ops: no CUDA device visible: kernels not self-tested (the first use on a "
              "GPU will)")
        return True

    if _backend.extension() is None:
        print(f"megalm ops: not self-tested: {_backend.unavailable_reason()}")
        return False
    device = torch.device("cuda", torch.cuda.current_device())
    record = selftest.run_all(device, _backend.build_dir())
    for name, res in record["kernels"].items():
        verdict = "pass" if res["ok"] else "FAIL (auto falls back to the reference)"
        print(f"megalm ops: self-test {name:<28} {verdict}: {res['detail']} ({res['seconds']} s)")
    return all(res["ok"] for res in record["kernels"].values())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
