"""The typed, validated settings of one `megalm prep` run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megalm.config import Invalid, Section

from .tokenizer import TokenizerSpec


@dataclass(frozen=True)
class PrepConfig(Section):
    inputs: tuple[str, ...]
    output: str
    text_key: str = "text"
    tokenizer: str | None = None  # an existing .model; None = train one with tokenizer_spec
    tokenizer_spec: TokenizerSpec = field(default_factory=TokenizerSpec)
    tokenizer_sample_mb: float = 10.0  # text sampled (by document hash) to train the tokenizer
    workers: int = 1
    valid_fraction: float = 0.005
    shard_size_mb: float = 16.0
    dedup: bool = False
    min_chars: int = 1
    min_tokens: int = 0
    skip_bad: bool = False
    overwrite: bool = False
    max_document_mb: float = 64.0  # a larger document (JSON line, .txt file, value) is refused
    strict_vocab: bool = False  # refuse a trained vocabulary smaller than asked

    @property
    def max_document_chars(self) -> int:
        return int(self.max_document_mb * (1 << 20))

    def validate(self) -> None:
        if not self.inputs:
            raise Invalid("inputs", "expected at least one input")
        if not self.output:
            raise Invalid("--output", "expected a directory")
        if not self.text_key:
            raise Invalid("--text-key", "expected a non-empty key")
        if self.workers < 1:
            raise Invalid("--workers", f"expected >= 1, got {self.workers}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise Invalid("--valid-fraction", f"expected 0 <= f < 1, got {self.valid_fraction}")
        if not self.shard_size_mb > 0:
            raise Invalid("--shard-size-mb", f"expected > 0, got {self.shard_size_mb}")
        if not self.tokenizer_sample_mb > 0:
            raise Invalid("--tokenizer-sample-mb", f"expected > 0, got {self.tokenizer_sample_mb}")
        if not self.max_document_mb > 0:
            raise Invalid("--max-document-mb", f"expected > 0, got {self.max_document_mb}")
        if self.min_chars < 0 or self.min_tokens < 0:
            raise Invalid("--min-chars/--min-tokens", "expected >= 0")
        if self.tokenizer is None:
            self.tokenizer_spec.validate()

    def output_settings(self) -> dict:
        """Everything that determines the output bytes (not workers/ranks/overwrite)."""
        d = asdict(self)
        for key in ("output", "workers", "overwrite", "tokenizer", "max_document_mb",
                    "strict_vocab"):
            d.pop(key)
        d["inputs"] = list(self.inputs)
        d["tokenizer_spec"]["special_tokens"] = list(self.tokenizer_spec.special_tokens)
        if self.tokenizer is not None:  # a given model: its sha256 stands for it
            d.pop("tokenizer_spec")
            d.pop("tokenizer_sample_mb")
        return d
