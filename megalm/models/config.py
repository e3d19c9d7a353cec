"""`LLMConfig`: every architectural choice of the decoder LM, validated when constructed.

YAML presets (configs/models/*.yaml) map one-to-one onto these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megalm.config import Invalid, Section, build

MLPS = ("swiglu", "gelu", "relu2")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
INITS = ("normal", "scaled_normal")


@dataclass
class LLMConfig(Section):
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    # None = n_heads (multi-head); 1 = MQA; in between = GQA.
    n_kv_heads: int | None = None
    mlp: str = "swiglu"
    # Explicit MLP width; None derives it with Llama's rule (see `ffn_hidden`).
    mlp_hidden: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Biases in the attention/MLP linears and in LayerNorm (GPT-2 style); RMSNorm never has one.
    bias: bool = False
    dropout: float = 0.0
    # "normal": every weight N(0, init_std); "scaled_normal": plus GPT-2's residual scaling,
    # output projections of attention and MLP get init_std / sqrt(2 * n_layers).
    init: str = "scaled_normal"
    init_std: float = 0.02
    # Recompute every k-th block (blocks 0, k, 2k, ...) in backward; 0 = off, 1 = every block.
    activation_checkpointing: int = 0
    # Recipe options (modded-nanogpt), all off by default so presets keep their parameter counts.
    # RMSNorm (learned weight [head_dim]) on each head's q and k, before RoPE.
    qk_norm: bool = False
    # Attention and MLP output projections (wo, w2) start at zero: every block starts as identity.
    zero_init_proj: bool = False
    # Logits become logit_softcap * tanh(logits / logit_softcap); None = uncapped.
    logit_softcap: float | None = None
    # Value embeddings: this many extra [vocab, n_kv_heads * head_dim] token tables; table i is
    # mixed into the attention values of layer i and of layer n_layers - value_embeds + i (the
    # first and last layers share a table). 0 = off.
    value_embeds: int = 0

    def __post_init__(self) -> None:
        # Built directly too (import-hf, tests, saved configs): it never exists invalid.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            _check_int(key, getattr(self, key), minimum=1)
        _check_int("activation_checkpointing", self.activation_checkpointing, minimum=0)
        _check_int("value_embeds", self.value_embeds, minimum=0)
        if 2 * self.value_embeds > self.n_layers:
            raise Invalid("value_embeds", f"each table feeds one of the first and one of the last layers, so "
                          f"at most n_layers / 2 = {self.n_layers // 2}, got {self.value_embeds}")
        _check_int("n_kv_heads", self.n_kv_heads, minimum=1)
        if self.mlp_hidden is not None:
            _check_int("mlp_hidden", self.mlp_hidden, minimum=1)
        for key, choices in (("mlp", MLPS), ("norm", NORMS), ("positions", POSITIONS), ("init", INITS)):
            if getattr(self, key) not in choices:
                raise Invalid(key, f"expected one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key in ("tie_embeddings", "bias", "qk_norm", "zero_init_proj"):
            if not isinstance(getattr(self, key), bool):
                raise Invalid(key, f"expected true or false, got {getattr(self, key)!r}")
        for key in ("norm_eps", "rope_theta", "init_std"):
            _check_positive_float(key, getattr(self, key))
        for key in ("ffn_dim_multiplier", "logit_softcap"):
            if getattr(self, key) is not None:
                _check_positive_float(key, getattr(self, key))
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise Invalid("dropout", f"expected a number in [0, 1), got {self.dropout!r}")
        if self.dim % self.n_heads:
            raise Invalid("n_heads", f"must divide dim={self.dim}, got {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise Invalid("n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise Invalid("n_heads", f"RoPE needs an even head_dim, got dim/n_heads={self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def value_embed_table(self, layer: int) -> int | None:
        """Index of the value-embedding table layer `layer` mixes in, or None."""
        k = self.value_embeds
        if layer < k:
            return layer
        if layer >= self.n_layers - k:
            return layer - (self.n_layers - k)
        return None

    @property
    def ffn_hidden(self) -> int:
        """MLP width: explicit `mlp_hidden`, else Llama's rule.

        SwiGLU has three matrices, so its base width is 2/3 of 4*dim to keep the parameter count of
        a 4*dim GELU MLP; then `ffn_dim_multiplier` scales it and it rounds up to `multiple_of`.
        """
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = 4 * self.dim
        if self.mlp == "swiglu":
            hidden = int(2 * hidden / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> "LLMConfig":
        """Build from a mapping (parsed YAML); errors name `source` and the offending key."""
        return build(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise Invalid(key, f"expected an integer >= {minimum}, got {value!r}")


def _check_positive_float(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise Invalid(key, f"expected a positive number, got {value!r}")
