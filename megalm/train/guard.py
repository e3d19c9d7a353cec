"""Bad-step guard: a step whose loss is NaN/inf or spikes above k x the running mean is not applied.

The decision is global: every rank contributes (loss sum, count, non-finite count) to one
all_reduce, so all ranks skip together. It is made once per step, before the optimizer runs (by
the loop after the last backward; under a pipeline engine, by the hook megalm puts in front of
DeepSpeed's optimizer step); the optimizer only reads it (`skip_update`). A skipped step leaves
parameters and optimizer state untouched (the engine then clears the grads).

Losses stay on the device until the decision: `record` only adds tensors, and `decide` reads the
reduced result back with one `.tolist()` — the step's single host synchronisation. The same
reduction carries which stop signals any rank received, so stopping costs no second sync, and,
with AdamW at ZeRO 0-3, each rank's share of the squared gradient norm: the global norm arrives with
the decision and a non-finite one marks the step bad (DeepSpeed's per-parameter overflow check and
norms, ~10 kernels per parameter and host reads, are off there; ZeRO 1-3 clip with this norm in
DeepSpeed, ZeRO-0 in megalm).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from launcher.diagnose import CollectiveWatch
from megalm.ops import FusedAdamW
from megalm.train.config import BadStepsSection

class StepGuard:
    def __init__(self, cfg: BadStepsSection, stop_signals: tuple[int, ...] = ()):
        self.cfg = cfg
        self.stop_signals = stop_signals  # reduced with the losses: any rank's signal stops all
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.consecutive_bad = 0
        self.skipped_total = 0
        self.recording = True  # off during eval so eval losses never count
        self.poison = False  # test hook: this step's losses become NaN (set by the loop)
        self._sum: torch.Tensor | None = None  # device: sum of finite micro-batch losses
        self._nonfinite: torch.Tensor | None = None  # device: count of non-finite ones
        self._count = 0.0
        # Ranks whose recorded losses are shares of one micro batch's loss (sequence parallelism):
        # each counts 1/shares of a micro batch, so the reduced mean is per micro batch.
        self.loss_shares = 1
        self.pending_signal = 0  # set from a signal handler; folded into the next decision
        self.stop_signal = 0  # the reduced decision: a signal number any rank received, or 0
        self.last_loss = float("nan")
        self.grad_norm = float("nan")  # global gradient norm of the last decision that carried one
        self.last_bad = False
        self.decided = False
        self.device = torch.device("cpu")  # where the decision all_reduce runs (CUDA under NCCL)
        self.watch: CollectiveWatch | None = None  # told when this rank enters and leaves a step's collectives
        self.step = 0
        self.reductions = 0  # decisions reduced so far: one per step (tests hold the loop to it)
        self.begun = False  # a training step has begun (before: the engine is still being built)

    def begin_step(self, poison: bool = False, step: int = 0) -> None:
        self._sum, self._nonfinite, self._count = None, None, 0.0
        self.step = step
        if self.watch is not None:  # from here until the reduction returns, peers are awaited
            self.watch.arrive(step)
        self.poison = poison
        self.decided = False
        self.begun = True

    def record(self, loss: torch.Tensor) -> torch.Tensor:
        """Called on each micro-batch loss where it is computed; returns the (maybe poisoned) loss.
        No host synchronisation: the value stays on the device."""
        if not self.recording:
            return loss
        if self.poison:
            loss = loss * float("nan")
        value = loss.detach().to(torch.float64)
        finite = torch.isfinite(value)
        part = torch.where(finite, value, torch.zeros_like(value))
        bad = (~finite).to(torch.float64)
        self._sum = part if self._sum is None else self._sum + part
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        self._count += 1 / self.loss_shares
        return loss

    def _reduced(self, grad_sumsq: torch.Tensor | None) -> list[float]:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        flags = [1.0 if self.pending_signal == s else 0.0 for s in self.stop_signals]
        sumsq = [] if grad_sumsq is None else [grad_sumsq.to(self.device, torch.float64).reshape(())]
        t = torch.stack([
            zero if self._sum is None else self._sum.to(self.device).reshape(()),
            zero + self._count,
            zero if self._nonfinite is None else self._nonfinite.to(self.device).reshape(()),
            *(zero + f for f in flags),
            *sumsq,
        ])
        self.reductions += 1
        if dist.is_initialized():
            dist.all_reduce(t)
        values = t.tolist()  # the one host synchronisation of the step (under NCCL it waits here)
        if self.watch is not None:
            self.watch.left()
        return values

    def decide(self, grad_sumsq: torch.Tensor | None = None) -> bool:
        """Collective: the global mean loss of this step, whether the step is bad, and whether
        any rank asked to stop. `grad_sumsq`: this rank's share of the squared gradient norm
        (shares summed over all ranks give the global one); a non-finite norm makes the step bad."""
        if self.decided:
            return self.last_bad
        total, count, nonfinite, *flags = self._reduced(grad_sumsq)
        if grad_sumsq is not None:
            sumsq = flags.pop()
            self.grad_norm = math.sqrt(sumsq) if math.isfinite(sumsq) and sumsq >= 0 else float("nan")
        self.stop_signal = next((s for s, f in zip(self.stop_signals, flags) if f), self.stop_signal)
        mean = total / count if count and not nonfinite else float("nan")
        bad = nonfinite > 0 or not math.isfinite(mean) or (grad_sumsq is not None and math.isnan(self.grad_norm))
        if not bad and self.cfg.spike_factor and self.history:
            bad = mean > self.cfg.spike_factor * (sum(self.history) / len(self.history))
        if bad:
            self.consecutive_bad += 1
            self.skipped_total += 1
        else:
            self.consecutive_bad = 0
            self.history.append(mean)
        self.last_loss, self.last_bad, self.decided = mean, bad, True
        return bad

    def skip_update(self) -> bool:
        """The optimizer's question before it updates: is this step's decision `bad`? The
        decision must already be made: an optimizer running first would step on an unchecked
        gradient, so that is an error, not a silent collective from inside the optimizer.

        Before the first step, the answer is skip: DeepSpeed's ZeRO-0 fp16/bf16 wrapper steps the
        optimizer on zero gradients while it is constructed (to create Adam's state), which with
        AdamW would still apply weight decay to the initial weights."""
        if not self.begun:
            return True
        if not self.decided:
            raise RuntimeError("the optimizer ran before the step guard decided this step (megalm decides after "
                               "the last backward, before the optimizer step)")
        return self.last_bad

    @property
    def must_roll_back(self) -> bool:
        return self.consecutive_bad >= self.cfg.max_consecutive

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive_bad": self.consecutive_bad,
                "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.consecutive_bad = int(state["consecutive_bad"])
        self.skipped_total = int(state["skipped_total"])


class GuardedAdamW(FusedAdamW):
    """FusedAdamW that skips the update the guard marked bad. DeepSpeed's ZeRO wrappers may call
    `step` once per param group; each call reads the same decision."""

    skip_update: Callable[[], bool] | None = None  # StepGuard.skip_update, set by the trainer

    def step(self, closure=None):  # noqa: D102 - same contract as torch.optim.Optimizer.step
        if self.skip_update is not None and self.skip_update():
            return None
        return super().step(closure)
