"""AdamW with decoupled weight decay; one multi-tensor kernel launch per dtype group on CUDA.

The reference is a per-tensor loop with exactly torch.optim.AdamW's (foreach=False) arithmetic.
With `master_weights=True`, bf16/fp16 params get an fp32 master copy and fp32 moments; the update
happens on the master, which is then rounded into the param.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch

from megalm.ops._backend import extension, use_cuda
from megalm.ops.selftest import Case


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _adamw_tensor_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                            step: float, lr: float, beta1: float, beta2: float, eps: float,
                            weight_decay: float) -> None:
    """One torch.optim.AdamW step on one tensor, same operation order (bit-exact in fp32)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with a multi-tensor CUDA kernel.

    State per param: "step" (fp32 0-d tensor, like torch), "exp_avg", "exp_avg_sq", and
    "master" (fp32 copy) when master_weights=True and the param is bf16/fp16.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, master_weights: bool = False,
                 backend: str = "auto") -> None:
        if lr < 0:
            raise ValueError(f"FusedAdamW: lr={lr}: expected >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: betas={betas}: expected each in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"FusedAdamW: eps={eps}, weight_decay={weight_decay}: expected >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_weights=master_weights)
        super().__init__(params, defaults)
        self.backend = backend

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """torch's load rounds every floating state tensor to its param's dtype: the fp32 masters
        and moments of bf16/fp16 params would come back in bf16/fp16. A param's state saved with a
        master keeps its dtypes; one saved without follows torch (moments in the param's dtype),
        which is the layout the kernel expects of a param without a master."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            if "master" not in saved.get(i, {}):
                continue
            for key, value in saved[i].items():
                if key != "step" and torch.is_tensor(value) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.detach().to(p.device, copy=True)

    def _state_for(self, p: torch.Tensor, master_weights: bool) -> dict:
        state = self.state[p]
        if not state:
            use_master = master_weights and p.dtype in (torch.bfloat16, torch.float16)
            state["step"] = torch.tensor(0.0)
            if use_master:
                state["master"] = p.detach().float().clone(memory_format=torch.contiguous_format)
            sdtype = torch.float32 if use_master else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype,
                                                   memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            kernel_dtypes = all(p.dtype in _KERNEL_DTYPES for p in params)
            if kernel_dtypes and use_cuda(self.backend, *params, kernel="FusedAdamW"):
                self._step_cuda(params, group["master_weights"], hyper)
            else:
                self._step_reference(params, group["master_weights"], hyper)
        return loss

    def _step_reference(self, params: list[torch.Tensor], master_weights: bool, hyper: tuple) -> None:
        for p in params:
            state = self._state_for(p, master_weights)
            state["step"] += 1
            step = state["step"].item()
            if "master" in state:
                master = state["master"]
                _adamw_tensor_reference(master, p.grad.float(), state["exp_avg"],
                                        state["exp_avg_sq"], step, *hyper)
                p.copy_(master)
            else:
                _adamw_tensor_reference(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step,
                                        *hyper)

    def _step_cuda(self, params: list[torch.Tensor], master_weights: bool, hyper: tuple) -> None:
        # One launch per (device, param dtype, has master, step): the kernel takes scalar
        # bias corrections, so tensors at different step counts go in different launches.
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if not p.is_contiguous() or not p.grad.is_contiguous() or p.grad.dtype != p.dtype:
                raise RuntimeError("FusedAdamW(cuda): params and grads must be contiguous and "
                                   f"share a dtype, got {p.dtype}/{p.grad.dtype}")
            state = self._state_for(p, master_weights)
            state["step"] += 1
            key = (p.device, p.dtype, "master" in state, state["step"].item())
            groups[key].append(p)
        lr, beta1, beta2, eps, wd = hyper
        for (_, _, has_master, step), ps in groups.items():
            st = [self.state[p] for p in ps]
            extension().multi_tensor_adamw(
                ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                [s["master"] for s in st] if has_master else [],
                lr, beta1, beta2, eps, wd, 1 - beta1**step, 1 - beta2**step)


SELFTEST_SHAPES = [(3 * 65536 + 9,), (17, 33), (1,)] + [(37,)] * 60


def check_against_fp32_steps(device: torch.device, dtype: torch.dtype, master: bool,
                             shapes: list[tuple[int, ...]], steps: int = 4) -> None:
    """Run the kernel for `steps` steps on params of `shapes` (+ one misaligned view, one param
    skipping step 2). After EVERY step its params, moments (and masters) must equal one fp32
    AdamW step taken from its own previous state and rounded once to the state dtype (within one
    ulp of it) — with lr = 0.1 a kernel that does nothing fails at once."""
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.95), 1e-8, 0.1
    g = torch.Generator(device=device).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, device=device).to(dtype)) for s in shapes]
    owner = torch.randn(1001, generator=g, device=device).to(dtype)
    ps.append(torch.nn.Parameter(owner[1:]))  # starts one element in: not 16-byte aligned
    opt = FusedAdamW(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, master_weights=master,
                     backend="cuda")
    gg = torch.Generator(device=device).manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(ps):
            skip = step == 2 and i == 1  # a param left at a different step count
            p.grad = None if skip else torch.randn(p.shape, generator=gg, device=device).to(dtype)
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
        opt.step()
        for i, p in enumerate(ps):
            pb, sb = before[i]
            if p.grad is None:
                assert torch.equal(p.detach(), pb), f"tensor {i} moved without a grad"
                continue
            st = opt.state[p]
            zeros = torch.zeros(p.shape, device=device)
            w = (sb["master"] if "master" in sb else pb).float().clone()
            m = sb["exp_avg"].float().clone() if sb else zeros.clone()
            v = sb["exp_avg_sq"].float().clone() if sb else zeros.clone()
            _adamw_tensor_reference(w, p.grad.float(), m, v, st["step"].item(), lr, b1, b2, eps, wd)
            sdt = st["exp_avg"].dtype
            for name, got, want, tol in (("exp_avg", st["exp_avg"], m.to(sdt), ulp[sdt]),
                                         ("exp_avg_sq", st["exp_avg_sq"], v.to(sdt), ulp[sdt]),
                                         ("master", st.get("master"), w, ulp[torch.float32]),
                                         ("param", p.detach(), w.to(dtype), ulp[dtype])):
                if got is None:
                    continue
                torch.testing.assert_close(
                    got.float(), want.float(), rtol=tol, atol=tol * 1e-2,
                    msg=lambda msg, name=name, i=i, step=step: f"step {step} tensor {i} {name}: {msg}")


def selftest_cases(device: torch.device) -> list[Case]:
    """More tensors than one launch's metadata holds, several chunks, odd sizes, a misaligned
    view, a param skipping a step; params and moments checked after every step."""
    return [Case(f"{dtype} master={master}",
                 lambda dtype=dtype, master=master: check_against_fp32_steps(
                     device, dtype, master, SELFTEST_SHAPES))
            for dtype, master in ((torch.float32, False), (torch.bfloat16, True),
                                  (torch.bfloat16, False), (torch.float16, True),
                                  (torch.float16, False))]
