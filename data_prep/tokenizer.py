"""Sentencepiece: train on a sample, load, fingerprint, and encode fast.

The fast encoder caches the ids of each whitespace-separated word. That is exact only when a
piece can never cross a space, so it is enabled only for models whose spec guarantees it
(`split_by_whitespace`, `nmt_nfkc[_cf]` normalisation, dummy prefix, extra spaces removed) and
only for documents free of characters on which Python's `str.split` and sentencepiece's
normaliser could disagree (see `UNSAFE_RANGES`); other documents take the plain encode.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megalm.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Code points (inclusive ranges) where word-splitting could differ from sentencepiece:
# every whitespace other than ' \t\n\r', control/format/separator characters, characters whose
# NFKC form contains whitespace (e.g. U+00A8 -> ' \u0308'), U+2581 (sentencepiece's own
# space marker) and U+FFFD (nmt_nfkc maps it to a space).
# tests/data_prep/test_tokenizer.py checks it against unicodedata and the normaliser.
UNSAFE_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x0008), (0x000B, 0x000C), (0x000E, 0x001F), (0x007F, 0x00A0), (0x00A8, 0x00A8),
    (0x00AD, 0x00AD), (0x00AF, 0x00AF), (0x00B4, 0x00B4), (0x00B8, 0x00B8), (0x02D8, 0x02DD),
    (0x037A, 0x037A), (0x0384, 0x0385), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD),
    (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x1680, 0x1680), (0x180E, 0x180E),
    (0x1FBD, 0x1FBD), (0x1FBF, 0x1FC1), (0x1FCD, 0x1FCF), (0x1FDD, 0x1FDF), (0x1FED, 0x1FEE),
    (0x1FFD, 0x1FFE), (0x2000, 0x200F), (0x2017, 0x2017), (0x2028, 0x202F), (0x203E, 0x203E),
    (0x205F, 0x2064), (0x2066, 0x206F), (0x2581, 0x2581), (0x3000, 0x3000), (0x309B, 0x309C),
    (0xFC5E, 0xFC63), (0xFDFA, 0xFDFB), (0xFE49, 0xFE4C), (0xFE70, 0xFE70), (0xFE72, 0xFE72),
    (0xFE74, 0xFE74), (0xFE76, 0xFE76), (0xFE78, 0xFE78), (0xFE7A, 0xFE7A), (0xFE7C, 0xFE7C),
    (0xFE7E, 0xFE7E), (0xFEFF, 0xFEFF), (0xFFE3, 0xFFE3), (0xFFF9, 0xFFFB),
    (0xFFFD, 0xFFFD), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)
_UNSAFE_CHARS = frozenset(chr(c) for a, b in UNSAFE_RANGES for c in range(a, b + 1))
_SAFE_ASCII = bytes(range(0x20, 0x7F)) + b"\t\n\r"
_CACHE_SAFE_NORMALIZERS = {"nmt_nfkc", "nmt_nfkc_cf"}


@dataclass(frozen=True)
class TokenizerSpec:
    """How to train a tokenizer when none is given."""

    model_type: str = "bpe"
    vocab_size: int = 32000
    byte_fallback: bool = False
    special_tokens: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise UserError(f"--tokenizer-type: expected bpe or unigram, got {self.model_type!r}")
        if not 8 <= self.vocab_size <= 1 << 22:
            raise UserError(f"--vocab-size: expected 8..{1 << 22}, got {self.vocab_size}")
        for tok in self.special_tokens:
            if not tok or any(c.isspace() for c in tok):
                raise UserError(f"--special-tokens: {tok!r} must be non-empty without spaces")


def train(lines: Iterable[str], spec: TokenizerSpec, num_threads: int = 2) -> bytes:
    """Train a sentencepiece model on `lines`; returns the serialized model."""
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type=spec.model_type,
            vocab_size=spec.vocab_size, byte_fallback=spec.byte_fallback,
            user_defined_symbols=list(spec.special_tokens), pad_id=PAD_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, unk_id=UNK_ID, num_threads=num_threads,
            # Small corpora would otherwise abort with "vocab size too high"; the manifest
            # records the size actually reached.
            hard_vocab_limit=False, minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(f"--vocab-size {spec.vocab_size}: tokenizer training failed: "
                        f"{str(exc).strip().splitlines()[-1]}") from None
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
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        return {}
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    return {p.piece: i for i, p in enumerate(proto.pieces)
            if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def word_cache_is_exact(model: bytes) -> bool:
    """True when encoding word by word provably equals encoding the whole text."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: we cannot read the spec, so stay on the safe path
        return False
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if (norm.name not in _CACHE_SAFE_NORMALIZERS or norm.normalization_rule_tsv
            or not norm.add_dummy_prefix or not norm.remove_extra_whitespaces
            or not trainer.split_by_whitespace or trainer.treat_whitespace_as_suffix
            or trainer.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM)):
        return False
    if any(any(c.isspace() for c in p.piece) for p in proto.pieces):
        return False
    # The spec says so; check that the ASCII separators really act as spaces for this model.
    sp = spm.SentencePieceProcessor(model_proto=model)
    return sp.encode("ab\tcd\nef\rgh  ij ") == sp.encode("ab cd ef gh ij")


def cache_safe(text: str) -> bool:
    """True when `text` holds no character of UNSAFE_RANGES."""
    if text.isascii():  # the common case: delete the safe bytes in C, anything left is unsafe
        return not text.encode("ascii").translate(None, _SAFE_ASCII)
    return _UNSAFE_CHARS.isdisjoint(text)


class Encoder:
    """Encodes batches of documents to one flat id array plus per-document lengths."""

    def __init__(self, model: bytes, num_threads: int = 1, word_cache: bool | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.dtype = np.dtype(token_dtype(self.sp.get_piece_size()))
        self.num_threads = num_threads
        self.word_cache = word_cache_is_exact(model) if word_cache is None else word_cache
        self._index: dict[str, int] = {}  # word -> row in the tables below
        self._starts = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._table = np.zeros(0, self.dtype)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids of all documents concatenated, number of ids per document)."""
        if not self.word_cache:
            return self._plain(texts)
        fast = [i for i, t in enumerate(texts) if cache_safe(t)]
        if len(fast) == len(texts):
            return self._cached(texts)
        fast_ids, fast_lens = self._cached([texts[i] for i in fast])
        slow = sorted(set(range(len(texts))) - set(fast))
        slow_ids, slow_lens = self._plain([texts[i] for i in slow])
        return _interleave(len(texts), fast, fast_ids, fast_lens, slow, slow_ids, slow_lens)

    def _plain(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.sp.encode(list(texts), num_threads=self.num_threads)
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), self.dtype, int(lens.sum()))
        return flat, lens

    def _cached(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        words = [t.split() for t in texts]
        flat_words = list(chain.from_iterable(words))
        n = len(flat_words)
        rows = np.fromiter(map(self._index.get, flat_words, repeat(-1)), np.int64, n)
        missing = np.flatnonzero(rows < 0)
        if len(missing):  # first sight of these words: encode each once, then look up again
            self._add_words(sorted({flat_words[i] for i in missing}))
            rows[missing] = [self._index[flat_words[i]] for i in missing]
        lens = self._lens[rows]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if n else 0
        # Position k of the output takes table[start(word) + (k - first output pos of word)].
        gather = np.repeat(self._starts[rows] - (ends - lens), lens) + np.arange(total)
        ids = self._table[gather]
        word_ends = np.cumsum(np.fromiter(map(len, words), np.int64, len(words)))
        tok_ends = np.concatenate([[0], ends])[word_ends]
        doc_lens = np.diff(np.concatenate([[0], tok_ends]))
        return ids, doc_lens.astype(np.int64)

    def _add_words(self, new: list[str]) -> None:
        ids = self.sp.encode(new, num_threads=self.num_threads)
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        base = len(self._index)
        self._index.update(zip(new, range(base, base + len(new))))
        starts = len(self._table) + np.concatenate([[0], np.cumsum(lens)[:-1]])
        self._starts = np.concatenate([self._starts, starts])
        self._lens = np.concatenate([self._lens, lens])
        flat = np.fromiter(chain.from_iterable(ids), self.dtype, int(lens.sum()))
        self._table = np.concatenate([self._table, flat])


def _interleave(n, a_idx, a_ids, a_lens, b_idx, b_ids, b_lens):
    """Merge two encoded subsets back into document order."""
    lens = np.zeros(n, np.int64)
    lens[a_idx] = a_lens
    lens[b_idx] = b_lens
    a_off = np.concatenate([[0], np.cumsum(a_lens)])
    b_off = np.concatenate([[0], np.cumsum(b_lens)])
    pieces, ai, bi = [], 0, 0
    b_set = set(b_idx)
    for i in range(n):
        if i in b_set:
            pieces.append(b_ids[b_off[bi]:b_off[bi + 1]])
            bi += 1
        else:
            pieces.append(a_ids[a_off[ai]:a_off[ai + 1]])
            ai += 1
    dtype = a_ids.dtype
    return (np.concatenate(pieces).astype(dtype, copy=False) if pieces
            else np.zeros(0, dtype)), lens
