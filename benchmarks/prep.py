"""`megalm prep` at its default settings vs a Megatron-LM `tools/preprocess_data.py`-style
baseline, on unrepeated corpora built from what every machine of this kind ships.

Corpora (built once under --cache-dir, deterministic for a given Python and torch version; both
recorded in the JSON): `code_one_file` — one JSONL of every .py/.pyi file of the pinned torch
wheel (Makefile: torch==2.13.0), its C++ headers (.h/.hpp/.cuh) and the Python standard library's
.py files (>= 100 MB); `code_many_files` — the same C++ headers alone, one JSONL per include
directory (hundreds of files);
`prose` — Python's help topics and the docstrings of the standard library and of torch.
Nothing is repeated to make a corpus bigger.

Both sides use the same tokenizer: the one `megalm prep` trains at its defaults (32k BPE on a
10 MB sample) in an untimed first run per corpus. Ours: `megalm prep` with every default
(16 MB shards, ...) and `--workers` = cores. Baseline (written here, the idea of Megatron's
script): json.loads + `SentencePieceProcessor.encode` per document in a Pool of `cores`
processes (imap, chunksize 32), int32 ids appended to a .bin plus a sizes index. Rounds
interleave the two; medians of wall and CPU seconds (self + children) are reported, with the
machine's load average (it is shared). `--profile` adds a one-process breakdown of where each
side spends its CPU time. Prints JSON; `--out FILE` also writes it.

    .venv/bin/python benchmarks/prep.py --out benchmarks/results/prep.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow
import sentencepiece as spm

from data_prep import readers
from data_prep.builtin import docstrings, iter_python_docs
from data_prep.config import PrepConfig
from data_prep.encoder import Encoder
from data_prep.pipeline import run
from data_prep.shards import encode_shard
from data_prep.units import UNIT_CHARS, split_units
from megalm.fsio import atomic_write

_sp = None


def _baseline_init(model_file: str) -> None:
    global _sp  # one processor per pool worker, as Megatron's Encoder.initializer does
    _sp = spm.SentencePieceProcessor(model_file=model_file)


def _baseline_encode(line: str) -> list[int]:
    return _sp.encode(json.loads(line)["text"])


def megatron_style(files: list[Path], model_file: Path, out_prefix: Path, workers: int) -> int:
    """Returns the number of tokens written."""
    tokens, sizes = 0, []
    with open(f"{out_prefix}.bin", "wb") as fbin, mp.get_context("fork").Pool(
            workers, _baseline_init, (str(model_file),)) as pool:
        for path in files:
            with open(path, encoding="utf-8") as fin:
                for ids in pool.imap(_baseline_encode, fin, chunksize=32):
                    fbin.write(np.array(ids, dtype=np.int32).tobytes())
                    sizes.append(len(ids))
                    tokens += len(ids)
    np.array(sizes, dtype=np.int64).tofile(f"{out_prefix}.idx")
    return tokens


def ours(inputs: list[Path], out: Path, workers: int, model_file: Path | None) -> dict:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        return run(PrepConfig(inputs=tuple(map(str, inputs)), output=str(out), workers=workers,
                              tokenizer=None if model_file is None else str(model_file)))


def _cpu_seconds() -> float:
    """CPU time of this process plus its waited-for children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---- corpora -------------------------------------------------------------------------------

def _sources(root: Path, suffixes: tuple[str, ...], skip: set[str] = frozenset()) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        found += [Path(dirpath) / f for f in filenames if f.endswith(suffixes)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None  # a few test fixtures; skipping them is deterministic too


def _write_jsonl(path: Path, texts) -> None:
    atomic_write(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                               for t in texts if t))


def build_corpora(cache: Path) -> dict[str, list[Path]]:
    import torch

    torch_root = Path(torch.__file__).parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stdlib_py = _sources(stdlib, (".py",), {"site-packages", "dist-packages", "__pycache__"})
    torch_py = _sources(torch_root, (".py", ".pyi"), {"include", "__pycache__"})
    headers = _sources(torch_root / "include", (".h", ".hpp", ".cuh"))
    tag = f"v2-py{platform.python_version()}-torch{torch.__version__}"
    base = cache / tag
    corpora = {"code_one_file": [base / "code.jsonl"], "prose": [base / "prose.jsonl"]}
    if not (base / "done").exists():
        base.mkdir(parents=True, exist_ok=True)
        _write_jsonl(base / "code.jsonl", (_text(p) for p in torch_py + headers + stdlib_py))
        docs = list(iter_python_docs())
        for p in torch_py:
            docs += docstrings(p)
        _write_jsonl(base / "prose.jsonl", docs)
        by_dir: dict[str, list[Path]] = {}
        for p in headers:
            key = p.parent.relative_to(torch_root / "include").as_posix().replace("/", "__")
            by_dir.setdefault(key, []).append(p)
        (base / "headers").mkdir(exist_ok=True)
        for key, paths in by_dir.items():
            _write_jsonl(base / "headers" / f"{key or 'top'}.jsonl", (_text(p) for p in paths))
        atomic_write(base / "done", tag)
    corpora["code_many_files"] = sorted((base / "headers").glob("*.jsonl"))
    return corpora


# ---- measurement ---------------------------------------------------------------------------

def bench(name: str, files: list[Path], work: Path, rounds: int, workers: int,
          profile: bool) -> dict:
    inputs = [files[0].parent] if len(files) > 1 else files
    t = time.perf_counter()
    first = ours(inputs, work / f"{name}-train", workers, None)  # trains the default tokenizer
    first_s = time.perf_counter() - t
    model_file = work / f"{name}.model"
    shutil.copy(work / f"{name}-train" / "tokenizer.model", model_file)
    shutil.rmtree(work / f"{name}-train")
    times: dict[str, list[float]] = {"megatron_style": [], "default": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for side in times:
            out = work / f"{name}-{side}-{r}"
            out.mkdir()
            t, c = time.perf_counter(), _cpu_seconds()
            if side == "megatron_style":
                tokens[side] = megatron_style(files, model_file, out / "data", workers)
            else:
                tokens[side] = ours(inputs, out, workers, model_file)["stats"]["tokens"]
            times[side].append(time.perf_counter() - t)
            cpu[side].append(_cpu_seconds() - c)
            shutil.rmtree(out)
            print(f"{name} round {r} {side}: {times[side][-1]:.2f}s "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    if tokens["megatron_style"] != tokens["default"]:
        raise SystemExit(f"{name}: token counts differ: {tokens}")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "files": len(files), "jsonl_bytes": sum(p.stat().st_size for p in files),
        "documents": first["stats"]["documents_in"], "tokens": tokens["default"],
        "vocab_size": first["tokenizer"]["vocab_size"],
        "first_run_with_tokenizer_training_seconds": round(first_s, 2),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "median_cpu_seconds": {k: round(v, 3) for k, v in med_cpu.items()},
        "tokens_per_s": {k: round(tokens["default"] / v) for k, v in med.items()},
        "default_speedup_vs_megatron_style": round(med["megatron_style"] / med["default"], 2),
        "cpu_seconds_ratio": round(med_cpu["megatron_style"] / med_cpu["default"], 2),
    }
    if profile:
        result["profile_one_process_cpu_seconds"] = _profile(files, model_file)
    return result


def _profile(files: list[Path], model_file: Path) -> dict:
    """Where one process spends its CPU time: ours stage by stage, the baseline's calls."""
    out: dict[str, float] = {}
    t = time.process_time()
    docs = list(readers.iter_documents([readers.Source("jsonl", str(p), 0) for p in files],
                                       "text"))
    out["ours_read_json"] = time.process_time() - t
    enc = Encoder(model_file.read_bytes())
    t = time.process_time()
    encoded = [enc.encode(texts) for _, texts in split_units(docs, UNIT_CHARS)]
    out["ours_encode"] = time.process_time() - t
    t = time.process_time()
    for ids, lens in encoded:
        encode_shard(ids, lens, "uint16")
    out["ours_arrow_write"] = time.process_time() - t
    del docs, encoded
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    lines = [line for p in files for line in open(p, encoding="utf-8")]
    t = time.process_time()
    texts = [json.loads(line)["text"] for line in lines]
    out["baseline_json_loads"] = time.process_time() - t
    t = time.process_time()
    ids = [sp.encode(x) for x in texts]
    out["baseline_encode"] = time.process_time() - t
    t = time.process_time()
    for x in ids:
        np.array(x, dtype=np.int32).tobytes()
    out["baseline_to_int32"] = time.process_time() - t
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/megalm/bench-prep"))
    ap.add_argument("--corpora", default="code_one_file,code_many_files,prose")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    corpora = build_corpora(Path(args.cache_dir))
    work = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    import torch

    result = {
        "benchmark": "prep",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"sentencepiece": spm.__version__, "pyarrow": pyarrow.__version__,
                     "numpy": np.__version__, "torch (corpus source)": torch.__version__},
        "settings": {"ours": f"megalm prep defaults, --workers {args.workers}",
                     "baseline": f"json.loads + encode per document, Pool({args.workers}), "
                                 "imap chunksize 32, int32 .bin"},
        "rounds": args.rounds,
        "corpora": {},
    }
    try:
        for name in args.corpora.split(","):
            result["corpora"][name] = bench(name, corpora[name], work, args.rounds,
                                            args.workers, args.profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")


if __name__ == "__main__":
    main()
