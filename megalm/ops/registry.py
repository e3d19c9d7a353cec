"""Every fused kernel, the extension entry points it needs and the module holding its self-test
cases. Adding a kernel: its .cu + binding, an op module with `selftest_cases(device)`, one line here.
"""

from __future__ import annotations

from megalm.ops.selftest import Kernel

KERNELS: tuple[Kernel, ...] = (
    Kernel("rms_norm", ("rms_norm_fwd", "rms_norm_bwd"), "megalm.ops.rms_norm"),
    Kernel("layer_norm", ("layer_norm_fwd", "layer_norm_bwd"), "megalm.ops.layer_norm"),
    Kernel("adaln_layer_norm", ("adaln_fwd", "adaln_bwd"), "megalm.ops.adaln"),
    Kernel("apply_rope", ("rope_fwd",), "megalm.ops.rope"),
    Kernel("swiglu", ("swiglu_fwd", "swiglu_bwd"), "megalm.ops.swiglu"),
    Kernel("cross_entropy", ("cross_entropy_fwd", "scale_cast"), "megalm.ops.cross_entropy"),
    Kernel("fused_linear_cross_entropy", ("cross_entropy_fwd", "scale_cast"),
           "megalm.ops.fused_linear_cross_entropy"),
    Kernel("FusedAdamW", ("multi_tensor_adamw",), "megalm.ops.adamw"),
    Kernel("newton_schulz", ("newton_schulz",), "megalm.ops.newton_schulz"),
    Kernel("document_attention", ("doc_attention_fwd", "doc_attention_bwd"), "megalm.ops.doc_attention"),
)
