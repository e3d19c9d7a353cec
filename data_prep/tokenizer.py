"""Sentencepiece: train on a sample, load and fingerprint (fast encoding: `encoder.py`)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from megalm.config import Invalid, Section
from megalm.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class TokenizerSpec(Section):
    """How to train a tokenizer when none is given."""

    model_type: str = "bpe"
    vocab_size: int = 32000
    byte_fallback: bool = False
    special_tokens: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise Invalid("--tokenizer-type", f"expected bpe or unigram, got {self.model_type!r}")
        if not 8 <= self.vocab_size <= 1 << 22:
            raise Invalid("--vocab-size", f"expected 8..{1 << 22}, got {self.vocab_size}")
        for tok in self.special_tokens:
            if not tok or any(c.isspace() for c in tok):
                raise Invalid("--special-tokens", f"{tok!r} must be non-empty without spaces")


class _Guarded:
    """The training lines, keeping the reader's own error: raised inside sentencepiece's C++
    it would come back as a RuntimeError that no longer names the file and line."""

    def __init__(self, lines: Iterable[str]):
        self.lines, self.error = lines, None

    def __iter__(self):
        try:
            yield from self.lines
        except Exception as exc:  # re-raised by train() once sentencepiece has returned
            self.error = exc


def train(lines: Iterable[str], spec: TokenizerSpec, num_threads: int = 2) -> bytes:
    """Train a sentencepiece model on `lines`; returns the serialized model."""
    out = io.BytesIO()
    guarded = _Guarded(lines)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(guarded), model_writer=out, model_type=spec.model_type,
            vocab_size=spec.vocab_size, byte_fallback=spec.byte_fallback,
            user_defined_symbols=list(spec.special_tokens), pad_id=PAD_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, unk_id=UNK_ID, num_threads=num_threads,
            # Small corpora would otherwise abort with "vocab size too high"; the manifest
            # records the size actually reached.
            hard_vocab_limit=False, minloglevel=2,
        )
    except RuntimeError as exc:
        if guarded.error is not None:
            raise guarded.error from None
        raise UserError(f"--vocab-size {spec.vocab_size}: tokenizer training failed: "
                        f"{str(exc).strip().splitlines()[-1]}") from None
    if guarded.error is not None:
        raise guarded.error
    return out.getvalue()


def load_bytes(path: str | Path) -> bytes:
    """Read and check a `.model` file; a file sentencepiece cannot load is a UserError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"--tokenizer {path}: cannot read: {exc.strerror}") from None
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
        raise UserError(f"--tokenizer {path}: not a sentencepiece model "
                        f"({str(exc).strip().splitlines()[-1] or type(exc).__name__})") from None
    return data


def describe(model: bytes) -> dict:
    """Manifest `tokenizer` entry (without the path)."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return {"sha256": hashlib.sha256(model).hexdigest(), "vocab_size": sp.get_piece_size(),
            "eos_id": sp.eos_id(), "bos_id": sp.bos_id(), "pad_id": sp.pad_id(),
            "unk_id": sp.unk_id(), "special_tokens": _user_defined(model)}


def _user_defined(model: bytes) -> dict[str, int]:
    """{piece: id} of the user-defined symbols (--special-tokens)."""
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    return {p.piece: i for i, p in enumerate(proto.pieces)
            if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
