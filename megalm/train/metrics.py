"""What a run reports: one plain line per log interval, the same scalars to TensorBoard, and
`metrics.jsonl` (machine-readable, exact floats) in the run directory. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

from tqdm import tqdm


def peak_memory_gib() -> float:
    """The device's peak allocated memory; on CPU, this process's peak resident set."""
    import torch  # the metrics writer itself runs without torch (tests of its format)

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


def json_safe(value: Any) -> Any:
    """NaN/inf (no loss yet, no eval) become null: JSON has no NaN, and strict readers reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_line(m: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"gnorm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:,.0f}"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"FLOP/s {m['flops_per_s']:.3g}")
    parts += [f"mem {m['memory_gib']:.2f} GiB", f"eta {_fmt_eta(m['eta_s'])}", f"skipped {m['skipped_steps']}"]
    if m.get("loss_scale", 1.0) != 1.0:
        parts.append(f"scale {m['loss_scale']:g}")
    return " | ".join(parts)


class Metrics:
    def __init__(self, run_dir: str, tensorboard_dir: str, total_steps: int, start_step: int,
                 enabled: bool, progress: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self._tb = None
        self._jsonl = None
        self._bar = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        # tensorboard is a hard dependency: a missing install fails here, loudly, rather than
        # silently training without the curves.
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(tensorboard_dir)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=2.0)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def set_position(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def write(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        self._jsonl.write(json.dumps(json_safe({"kind": kind, **record}), allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if kind == "train":
            line = format_line(record, self.total_steps)
        elif kind == "eval":
            line = f"eval step {step} | loss {record['loss']:.4f} | ppl {math.exp(min(record['loss'], 50)):.2f}"
            line += "".join(f" | {k.removeprefix('loss_')} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        else:
            line = f"{kind} step {step} | " + " | ".join(f"{k} {v}" for k, v in record.items() if k != "step")
        (self._bar.write if self._bar is not None else print)(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
