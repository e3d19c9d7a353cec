"""`megalm <verb>`: a thin dispatcher; each verb's parser lives next to its code."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NoReturn

from megalm import __version__
from megalm.errors import UserError

# verb -> (module with main(argv) -> int, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "tokenize raw corpora into Arrow shards + manifest"),
    "train": ("megalm.train.cli", "train a model from a YAML config (DeepSpeed)"),
    "sample": ("megalm.train.sample", "generate text from a checkpoint"),
    "export": ("megalm.export.cli", "export a checkpoint for serving: Hugging Face, GGUF, diffusers"),
    "import-hf": ("megalm.export.import_hf", "turn a local Hugging Face Llama/GPT-2 folder into a megalm checkpoint"),
    "launch": ("launcher.cli", "start N local ranks of a command (torchrun-compatible env)"),
    "submit": ("megalm.train.submit", "submit a training run to Slurm (requeue + resume on preemption)"),
    "plan": ("megalm.plan", "per-GPU memory and step time for ZeRO stages / pipeline splits"),
    "ops": ("megalm.ops.cli", "build fused CUDA ops ahead of time / report what runs here"),
}


def _usage() -> str:
    lines = ["usage: megalm <verb> [args...]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, leaving: bool = False) -> int:
    """Run the verb in `argv` (default: the command line). `leaving`: the process exits right after
    without the interpreter's teardown (`run`), so a LEAVE_WITHOUT_TEARDOWN verb skips its own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in ("-V", "--version"):
        print(__version__)
        return 0
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        if leaving and verb in LEAVE_WITHOUT_TEARDOWN:
            return int(module.main(rest, teardown=False) or 0)
        return int(module.main(rest) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Verbs whose process ends by leaving the interpreter without its teardown (see `leave`).
LEAVE_WITHOUT_TEARDOWN = ("train",)


def run() -> NoReturn:
    """The `megalm` program (console script and `python -m megalm.cli`): `main`, then exit."""
    leaving = bool(sys.argv[1:2]) and sys.argv[1] in LEAVE_WITHOUT_TEARDOWN
    code = main(leaving=leaving)
    if leaving:
        leave(code)
    sys.exit(code)


def leave(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. A training rank has put everything on disk by now
    (checkpoints published, metrics and TensorBoard closed, summary written) and met every other
    rank in a last barrier; destroying the process group and the interpreter's teardown add only
    a race in torch/gloo C++ destructors that sometimes aborts a finished rank with SIGABRT
    ("terminate called without an active exception": once in seven CPU suite runs on 2026-12-06
    at interpreter exit, then once more inside destroy_process_group while its peer was still
    alive), turning a finished job into a failed one (134)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun reports a rank that exits without it as failed
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
