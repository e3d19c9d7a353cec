"""Fused ops: CUDA kernels when built (`megalm ops build`), exact PyTorch references otherwise.

Every op takes `backend="auto"|"reference"|"cuda"`; "auto" defers to the MEGALM_OPS env var,
then picks the kernel for CUDA tensors when a built extension matches the current sources and
that kernel passed its self-test on the device (megalm.ops.selftest, registry.py).
"""

from megalm.ops._backend import BACKENDS, resolve_backend
from megalm.ops.adaln import adaln_layer_norm, adaln_layer_norm_reference
from megalm.ops.adamw import FusedAdamW
from megalm.ops.cross_entropy import cross_entropy
from megalm.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from megalm.ops.layer_norm import layer_norm, layer_norm_reference
from megalm.ops.newton_schulz import newton_schulz, newton_schulz_reference
from megalm.ops.rms_norm import rms_norm, rms_norm_reference
from megalm.ops.rope import apply_rope, apply_rope_reference, rope_cos_sin
from megalm.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKENDS", "resolve_backend", "rms_norm", "layer_norm", "apply_rope", "rope_cos_sin", "swiglu",
    "cross_entropy", "fused_linear_cross_entropy", "adaln_layer_norm", "FusedAdamW",
    "rms_norm_reference", "layer_norm_reference", "apply_rope_reference", "swiglu_reference",
    "adaln_layer_norm_reference", "newton_schulz", "newton_schulz_reference",
]
