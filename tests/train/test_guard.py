"""StepGuard: NaN/inf and spikes mark a step bad, the optimizer then leaves weights and state alone."""

from __future__ import annotations

import math

import pytest
import torch

from megalm.train.config import BadStepsSection
from megalm.train.guard import GuardedAdamW, StepGuard


def step(guard: StepGuard, *losses: float, poison: bool = False) -> bool:
    guard.begin_step(poison=poison)
    for x in losses:
        guard.record(torch.tensor(x))
    return guard.decide()


def test_nan_inf_spike_and_streak():
    g = StepGuard(BadStepsSection(spike_factor=2.0, window=3, max_consecutive=2))
    assert not step(g, 4.0, 2.0) and g.last_loss == 3.0
    assert step(g, 1.0, float("nan")) and math.isnan(g.last_loss)
    assert not g.must_roll_back
    assert step(g, float("inf"))
    assert g.must_roll_back and g.skipped_total == 2
    assert not step(g, 3.5) and g.consecutive_bad == 0  # below 2 x mean(3.0)
    assert step(g, 7.0)  # > 2 x mean(3.0, 3.5)
    assert list(g.history) == [3.0, 3.5]  # bad steps never enter the running mean
    assert step(g, 1.0, poison=True)  # the test hook turns the loss into NaN
    state = g.state_dict()
    h = StepGuard(g.cfg)
    h.load_state_dict(state)
    assert h.state_dict() == state


def test_decide_is_once_per_step():
    g = StepGuard(BadStepsSection())
    g.begin_step()
    g.record(torch.tensor(1.0))
    assert not g.decide()
    g.record(torch.tensor(float("nan")))  # after the decision: does not change it
    assert not g.decide()


def test_eval_losses_are_not_recorded():
    g = StepGuard(BadStepsSection())
    g.begin_step()
    g.recording = False
    g.record(torch.tensor(float("nan")))
    g.recording = True
    g.record(torch.tensor(2.0))
    assert not g.decide() and g.last_loss == 2.0


def test_skipped_update_leaves_weights_and_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.1)
    g = StepGuard(BadStepsSection())
    opt.skip_update = g.skip_update
    # DeepSpeed's ZeRO-0 fp16/bf16 wrapper steps once on zero grads while it is built: no update
    # (AdamW would decay the initial weights), no collective, no skipped step counted.
    initial = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, initial) and g.reductions == 0 and g.skipped_total == 0
    p.grad = torch.ones_like(p)
    step(g, 1.0)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p, before)
    applied = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full_like(p, float("nan"))
    g.begin_step()
    g.record(torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="before the step guard decided"):
        opt.step()  # the optimizer never decides: it reads the decision made before it ran
    assert g.decide()
    opt.step()
    assert torch.equal(p, applied)
    assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())


def test_record_never_reads_the_device_and_decide_reads_once(monkeypatch):
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: (reads.append(_n), _r(self, *a))[1])
    g = StepGuard(BadStepsSection())
    g.begin_step()
    for x in (1.0, 3.0, float("inf")):
        g.record(torch.tensor(x))
    assert reads == []  # losses stay on the device while micro batches run
    assert g.decide() and reads == ["tolist"] and g.skipped_total == 1


def test_stop_requests_travel_with_the_decision():
    import signal

    g = StepGuard(BadStepsSection(), stop_signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    step(g, 1.0)
    assert g.stop_signal == 0
    g.pending_signal = signal.SIGUSR1  # what the handler does
    assert g.stop_signal == 0  # nothing acts on it before the step's reduction
    step(g, 1.0)
    assert g.stop_signal == signal.SIGUSR1


def test_gradient_norm_travels_with_the_decision(monkeypatch):
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append(1), real(self))[1])
    g = StepGuard(BadStepsSection())
    g.begin_step()
    g.record(torch.tensor(2.0))
    assert not g.decide(grad_sumsq=torch.tensor(25.0)) and g.grad_norm == 5.0 and reads == [1]
    for bad in (float("nan"), float("inf")):  # a finite loss with a non-finite gradient is a bad step
        g.begin_step()
        g.record(torch.tensor(2.0))
        assert g.decide(grad_sumsq=torch.tensor(bad)) and math.isnan(g.grad_norm)
    assert g.skipped_total == 2 and list(g.history) == [2.0]
