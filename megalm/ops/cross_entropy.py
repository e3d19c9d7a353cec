"""Softmax cross-entropy over a large vocab: loss and gradient in one pass over the logits.

The forward stores the UNSCALED gradient (softmax - onehot), zero on ignored rows, in the logits
dtype; backward multiplies it by dloss / n_targets in fp32 while writing the result. Scaling
first would break fp16: DeepSpeed's loss scale (2^16) is inf in fp16, and (softmax - onehot) / 16k
targets underflows before the loss scale arrives. No fp32 copy of the full logits ever exists
(the reference works on row blocks of bounded size, the kernel on one row per block).
"""

from __future__ import annotations

import torch

from megalm.ops._backend import extension, upcast, use_cuda
from megalm.ops.selftest import Case, compare, randn

# fp32 temporaries of the reference are bounded to this many elements (64 MiB).
_REF_BLOCK_ELEMS = 1 << 24


def _check_labels(safe: torch.Tensor, v: int) -> None:
    # Reading the answer is a host sync on a GPU, once per micro-batch; there the gather below
    # raises a device-side assert for a bad label anyway, so only CPU tensors are checked here.
    if safe.device.type != "cpu":
        return
    if bool(((safe < 0) | (safe >= v)).any()):
        raise IndexError(f"cross_entropy: label out of range [0, {v}) (and != ignore_index)")


def ce_rows_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                      out_grad: torch.Tensor | None = None, need_grad: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (fp32, 0 for ignored rows) and (softmax - onehot) in logits.dtype (or None)."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.promote_types(logits.dtype, torch.float32),
                       device=logits.device)
    grad = None
    if need_grad:
        grad = torch.empty_like(logits) if out_grad is None else out_grad
    rows = max(1, _REF_BLOCK_ELEMS // max(v, 1))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        lf = upcast(logits[s:e])
        lab = labels[s:e]
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab)).long()
        _check_labels(safe, v)
        # The loss comes from the same ops on both paths (evaluation and training), so it is
        # bit-identical by construction on every CPU: logsumexp - x rounds differently from
        # log_softmax's own reduction on some SIMD paths (seen on AVX2). One fused log_softmax
        # pass, then softmax = exp of it in place: ~3x fewer passes over the [rows, V] block than
        # logsumexp + subtract + exp (this is the CPU training path).
        lsm = torch.log_softmax(lf, dim=-1)
        tgt = lsm.gather(1, safe[:, None]).squeeze(1)
        loss[s:e] = torch.where(valid, -tgt, torch.zeros_like(tgt))
        if grad is None:  # loss only (evaluation): no gradient pass at all
            continue
        p = lsm.exp_()
        p.scatter_add_(1, safe[:, None], torch.full_like(tgt[:, None], -1.0))
        if p.device.type != "cpu" or not bool(valid.all()):  # no host sync on a GPU
            p.mul_(valid.to(p.dtype)[:, None])
        grad[s:e] = p  # copy_ casts to the logits dtype
    return loss, grad


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, cuda: bool,
            inplace: bool = False, need_grad: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch the row op; `inplace` lets the gradient overwrite `logits` (a temporary)."""
    if cuda:
        loss, grad = extension().cross_entropy_fwd(logits, labels, ignore_index, inplace, need_grad)
        return loss, (grad if need_grad else None)
    return ce_rows_reference(logits, labels, ignore_index,
                             out_grad=logits if inplace else None, need_grad=need_grad)


def target_scale(labels: torch.Tensor, ignore_index: int, logits_dtype: torch.dtype) -> torch.Tensor:
    """1 / number of targets as a 1-element tensor on the labels' device (no host sync).

    fp32, or fp64 for fp64 logits (oracles stay exact). One element, not 0-d: in `scale_into`
    a 0-d tensor would be cast to the fp16 operand's dtype before the multiply.

    With no targets at all the loss is defined as 0 with zero gradient, not NaN: a micro batch
    made only of padding must not poison training.
    """
    dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    n = (labels != ignore_index).sum().clamp_min(1).to(dtype)
    return (1.0 / n).reshape(1)


def scale_into(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype,
               cuda: bool = False) -> torch.Tensor:
    """grad * factor with the factor kept in fp32 (fp64), written once in `dtype`: one pass.

    The kernel reads the factor on the device. On the reference path the factor gets shape [1]
    on CUDA, so type promotion makes the multiply fp32 even for fp16 grads (a 0-d device tensor
    would first be cast to fp16: 65536 -> inf) and the cast happens on the write; on CPU a 0-d
    factor is read at full precision by the multiply kernel of reduced-precision dtypes, which
    stays on its vectorised same-dtype path (3x faster there).
    """
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if cuda and factor.dtype == torch.float32:
        extension().scale_cast(grad, factor, out)
        return out
    f = factor.reshape(()) if grad.device.type == "cpu" else factor.reshape(1)
    return torch.mul(grad, f, out=out)


def backward_factor(dloss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dloss / n_targets in fp32 (fp64 for fp64 oracles), shape [1]."""
    return dloss.to(scale.dtype).reshape(1) * scale


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, cuda):
        scale = target_scale(labels, ignore_index, logits.dtype)
        loss_rows, grad = ce_rows(logits.contiguous(), labels.long().contiguous(), ignore_index,
                                  cuda)
        ctx.save_for_backward(grad, scale)
        ctx.cuda = cuda
        return (loss_rows.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, dloss):
        grad, scale = ctx.saved_tensors
        factor = backward_factor(dloss, scale)
        return scale_into(grad, factor, grad.dtype, ctx.cuda), None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    """Mean CE over labels != ignore_index; logits [N, V], labels [N]; returns an fp32 scalar."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
                         ": expected logits [N, V] and labels [N]")
    cuda = use_cuda(backend, logits, labels, kernel="cross_entropy")
    if not (torch.is_grad_enabled() and logits.requires_grad):
        # Evaluation: loss only, no gradient written (half the memory traffic).
        lab = labels.long().contiguous()
        loss_rows, _ = ce_rows(logits.contiguous(), lab, ignore_index, cuda, need_grad=False)
        return (loss_rows.sum() * target_scale(lab, ignore_index, logits.dtype)).reshape(())
    return _CrossEntropy.apply(logits, labels, ignore_index, cuda)


def selftest_cases(device: torch.device) -> list[Case]:
    """Vocab >= 128k (even and odd), vector and scalar widths, ignored and all-ignored rows,
    out-of-range labels (NaN loss for that row, no fault), fp16 under a 2^16 loss scale."""
    cases = []

    def labels_for(n: int, v: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        lab = torch.randint(0, v, (n,), generator=g, device=device)
        lab[::3] = -100
        return lab

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, v in ((5, 131072), (4, 128003), (64, 1000), (3, 77)):
            def run(dtype=dtype, n=n, v=v):
                lab = labels_for(n, v, 1)
                compare(lambda x, backend: cross_entropy(x, lab, backend=backend),
                        [randn(n, v, device=device, seed=2, scale=4)], dtype, device, f"ce {n}x{v}")
                compare(lambda x, backend: cross_entropy(x, lab, backend=backend),
                        [randn(n, v, device=device, seed=2, scale=4)], dtype, device,
                        f"ce {n}x{v} loss only", grad=False)
            cases.append(Case(f"{dtype} {n}x{v}", run))

        def all_ignored(dtype=dtype):
            x = randn(4, 1000, device=device, seed=3).to(dtype).requires_grad_(True)
            loss = cross_entropy(x, torch.full((4,), -100, device=device), backend="cuda")
            loss.backward()
            assert loss.item() == 0.0 and bool((x.grad == 0).all()), "all-ignored rows"
        cases.append(Case(f"{dtype} all rows ignored", all_ignored))

        def out_of_range(dtype=dtype):
            x = randn(4, 4000, device=device, seed=4).to(dtype).contiguous()
            lab = torch.tensor([5, 4000 + 7, -7, 3999], device=device)
            loss, grad = ce_rows(x.clone(), lab, -100, cuda=True)
            ok = torch.tensor([0, 3], device=device)
            want, wgrad = ce_rows_reference(x[ok], lab[ok], -100)
            assert bool(torch.isnan(loss[1]) and torch.isnan(loss[2])), f"bad labels: loss {loss}"
            torch.testing.assert_close(loss[ok], want.float(), rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(grad[ok].float(), wgrad.float(), rtol=2e-2, atol=1e-3)
        cases.append(Case(f"{dtype} out-of-range labels", out_of_range))

    def fp16_loss_scale():
        x = randn(4096, 512, device=device, seed=5, scale=3)
        lab = labels_for(4096, 512, 6)
        lg = x.half().requires_grad_(True)
        (cross_entropy(lg, lab, backend="cuda") * 65536.0).backward()
        ref = x.half().float().requires_grad_(True)
        (torch.nn.functional.cross_entropy(ref, lab) * 65536.0).backward()
        assert bool(torch.isfinite(lg.grad).all()), "fp16 gradient overflowed under loss scale 2^16"
        err = (lg.grad.float() - ref.grad).abs().max() / ref.grad.abs().max()
        assert err <= 1e-2, f"fp16 loss-scaled gradient: relative error {err:.3e}"
    cases.append(Case("float16 loss scale 2^16", fp16_loss_scale))
    return cases
