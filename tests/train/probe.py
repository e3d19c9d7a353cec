"""Run `megalm` (the real CLI) with counters attached, for tests of what the trainer does per step:

    python -m tests.train.probe OUTDIR megalm-args...

Counts, per rank, into OUTDIR/probe.rank<R>.json (written even when the run stops on a signal):
- host synchronisations started from megalm's own code (Tensor.item/tolist/__float__/__int__/
  __bool__/numpy/cpu called from a file under megalm/) in the training loop's per-step path, i.e.
  in Trainer.run outside the interval work (log line, eval, save, summary), by site
  (file:line:function:method);
- optimizer steps run in this process;
- activation-checkpointed block calls; the dtype the engine trains in.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MEGALM_DIR = str(Path(__file__).resolve().parents[2] / "megalm") + os.sep
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")
INTERVAL_WORK = ("_log_train", "_eval", "save", "_summary", "weights_digest", "resume", "roll_back")


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    rank = os.environ.get("RANK", "0")
    counts = {"hot_syncs": 0, "hot_sync_sites": {}, "steps": 0, "checkpointed_calls": 0, "dtype": None,
              "bf16_enabled": None}
    state = {"in_run": False, "interval_depth": 0}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if (state["in_run"] and not state["interval_depth"]
                    and caller.co_filename.startswith(MEGALM_DIR)):
                counts["hot_syncs"] += 1
                site = (f"{os.path.relpath(caller.co_filename, MEGALM_DIR)}:{sys._getframe(1).f_lineno}:"
                        f"{caller.co_name}:{name}")
                counts["hot_sync_sites"][site] = counts["hot_sync_sites"].get(site, 0) + 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    import megalm.models.llm as llm
    from megalm.train import loop

    real_checkpoint = llm.checkpoint

    def checkpoint(*args, **kwargs):
        counts["checkpointed_calls"] += 1
        return real_checkpoint(*args, **kwargs)

    llm.checkpoint = checkpoint

    def interval(fn):
        def wrapper(*args, **kwargs):
            state["interval_depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state["interval_depth"] -= 1
        return wrapper

    for name in INTERVAL_WORK:
        setattr(loop.Trainer, name, interval(getattr(loop.Trainer, name)))
    real_run, real_step, real_init = loop.Trainer.run, loop.Trainer.train_step, loop.Trainer.__init__

    def run(self):
        state["in_run"] = True
        try:
            return real_run(self)
        finally:
            state["in_run"] = False

    def train_step(self, micro):
        counts["steps"] += 1
        return real_step(self, micro)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        counts["dtype"] = str(next(self.engine.module.parameters()).dtype)
        counts["bf16_enabled"] = bool(self.engine.bfloat16_enabled())

    loop.Trainer.run, loop.Trainer.train_step, loop.Trainer.__init__ = run, train_step, init
    from megalm.cli import main as megalm_main

    try:
        return megalm_main(argv)
    finally:
        Path(out, f"probe.rank{rank}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    sys.exit(main())
