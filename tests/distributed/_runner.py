"""Rank entry point for tests.distributed.helper: python -m tests.distributed._runner MOD:FN KWARGS OUTDIR."""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def main() -> int:
    target, kwargs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"ok": False}
    try:
        from megalm.engine.runtime import init_distributed

        init_distributed()
        module, fn = target.split(":")
        record = {"ok": True, "result": getattr(importlib.import_module(module), fn)(**kwargs)}
    except BaseException:  # report everything, including SystemExit from argparse-style code
        record = {"ok": False, "traceback": traceback.format_exc()}
    tmp = os.path.join(out, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    # Leave like `megalm train` (megalm.cli.leave): the result is on disk, and the interpreter's
    # teardown only adds the torch/gloo destructor race that sometimes aborts a finished rank
    # ("terminate called without an active exception": the export job's 2 ranks, once on 2026-12-06).
    from megalm.cli import leave

    leave(main())
