"""DeepSpeed's Muon, as megalm uses it: `MuonWithAuxAdam` built from megalm's parameter groups
(megalm.train.muon tags them by structure) and asking the step guard first, and its Newton–Schulz
routed to megalm.ops.newton_schulz.

Newton–Schulz: every ZeRO path reaches it through `original_muon.muon_update`, which looks
`zeropower_via_newtonschulz5` up by its module-global name for ns_method "standard". megalm points
that name at `megalm.ops.newton_schulz` (the same quintic iteration; the CUDA kernel through the ops
registry once it passed its self-test on the device, else the bit-identical PyTorch reference).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from megalm.ops.newton_schulz import newton_schulz


def guarded_muon(groups: list[dict[str, Any]], skip_update: Callable[[], bool]):
    """MuonWithAuxAdam (its own inline AdamW for the Adam half) that skips the update the step
    guard marked bad (`skip_update`: the decision, read).

    The class name keeps "Muon": DeepSpeed's ZeRO-1/2 tests the optimizer's class name for it."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    route_newton_schulz()

    class GuardedMuon(MuonWithAuxAdam):
        def step(self, closure=None, step_id=None):  # noqa: D102 - torch.optim.Optimizer.step
            if skip_update():
                return None
            return super().step(closure, step_id)

    return GuardedMuon(groups)


def route_newton_schulz() -> None:
    """Make DeepSpeed's Muon (every ZeRO stage, the pipeline, offload) orthogonalise with
    megalm.ops.newton_schulz. Idempotent; the one process-wide patch megalm applies to DeepSpeed.

    DeepSpeed torch.compiles `muon_update`; the routed op is kept out of that graph (a leaf run
    eagerly), so the kernel/reference choice and the self-test happen as in any other op."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    from deepspeed.runtime.zero.muon import original_muon

    current = original_muon.zeropower_via_newtonschulz5
    if getattr(current, "_torchdynamo_orig_callable", None) is newton_schulz:
        return
    original_muon.zeropower_via_newtonschulz5 = torch._dynamo.disable(newton_schulz)
