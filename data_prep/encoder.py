"""Encode documents fast with ids identical to sentencepiece's `encode(text)`.

Sentencepiece spends most of its time per token; prep instead encodes each distinct *segment*
once and reuses its ids. This is exact for BPE, whose merges never cross a segment boundary and
whose ties are broken by position within the segment; a unigram model's Viterbi search breaks
ties between equal-scoring paths by float sums over everything before them, so unigram models
take the plain encode. Two granularities, both exact only under conditions checked here:

- words (`str.split`): exact when no piece can contain a space, i.e. the model's spec says
  `split_by_whitespace`, `nmt_nfkc[_cf]` normalisation, dummy prefix, extra spaces removed,
  and the document holds no character on which `str.split` and the normaliser could disagree
  (`UNSAFE_RANGES`);
- runs of ASCII letters / other ASCII characters inside words, with the whitespace before
  them (`_SEGMENT`): also exact when no piece of the vocabulary mixes letters with non-letters
  or holds the space marker after its first character (sentencepiece's default
  `split_by_unicode_script` guarantees this; `fine_split_is_exact` checks the pieces), the
  model has no user-defined symbols (those match anywhere), and the document holds no
  character the vocabulary lacks (runs of unknown characters are merged into one <unk>).
  Source code, whose words rarely repeat, is made of a few thousand such runs.

Both keep the ids of a bounded number of segments (a worker's cache is reset when full), and
long documents are encoded in pieces cut at whitespace, so memory stays a few times the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from .tokenizer import token_dtype

# Code points (inclusive ranges) where word-splitting could differ from sentencepiece:
# every whitespace other than ' \t\n\r', control/format/separator characters, characters whose
# NFKC form contains whitespace (e.g. U+00A8 -> ' \u0308'), U+2581 (sentencepiece's own
# space marker) and U+FFFD (nmt_nfkc maps it to a space).
# tests/data_prep/test_encoder.py checks it against unicodedata and the normaliser.
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
_WS = " \t\n\r"
_SPACE_MARK = "\u2581"
_WS_CHAR = re.compile(r"[ \t\n\r]")
# Inside one ASCII piece body (bodies are joined by newlines, which no piece holds): a letter
# next to another printable ASCII character, or the space marker after the first character.
_MIXED_PIECE = re.compile(r"(?m)^(?=[\x21-\x7e\u2581]+$)(?:.*[A-Za-z][\x21-\x40\x5b-\x60\x7b-\x7e]"
                          r"|.*[\x21-\x40\x5b-\x60\x7b-\x7e][A-Za-z]|.*\u2581)")
PIECE_CHARS = 1 << 20  # documents are encoded in batches of about this many characters
CACHE_ENTRIES = 1 << 21  # segments remembered per cache before it starts afresh
_PLAIN, _WORDS = 0, 1


def _proto(model: bytes) -> pb.ModelProto:
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    return proto


def exact_caches(model: bytes) -> tuple[bool, bool]:
    """(whether the word cache is exact, whether ASCII words may also be cut into runs of
    letters / other characters); see the module doc. One parse, one pass over the pieces:
    every worker runs this at start."""
    proto = _proto(model)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if (norm.name not in _CACHE_SAFE_NORMALIZERS or norm.normalization_rule_tsv
            or not norm.add_dummy_prefix or not norm.remove_extra_whitespaces
            or not trainer.split_by_whitespace or trainer.treat_whitespace_as_suffix
            or trainer.model_type != pb.TrainerSpec.BPE):
        return False, False
    kinds = pb.ModelProto.SentencePiece
    pieces = [(p.piece, p.type) for p in proto.pieces]
    if any(c.isspace() for c in set("".join(piece for piece, _ in pieces))):
        return False, False
    # The spec says so; check that the ASCII separators really act as spaces for this model.
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.encode("ab\tcd\nef\rgh  ij ") != sp.encode("ab cd ef gh ij"):
        return False, False
    if any(kind == kinds.USER_DEFINED for _, kind in pieces):
        return True, False
    # Piece bodies (without the leading space marker) one per line; those that can match inside
    # an ASCII document must not hold the marker again nor mix letters with other characters.
    bodies = "\n".join(piece[1:] if piece.startswith(_SPACE_MARK) else piece
                       for piece, kind in pieces if kind == kinds.NORMAL)
    return True, _MIXED_PIECE.search(bodies) is None


def word_cache_is_exact(model: bytes) -> bool:
    """True when encoding word by word provably equals encoding the whole text."""
    return exact_caches(model)[0]


def fine_split_is_exact(model: bytes) -> bool:
    """True when ASCII words may be cut between letters and non-letters (see module doc)."""
    return exact_caches(model)[1]


def cache_safe(text: str) -> bool:
    """True when `text` holds no character of UNSAFE_RANGES."""
    if text.isascii():  # the common case: delete the safe bytes in C, anything left is unsafe
        return not text.encode("ascii").translate(None, _SAFE_ASCII)
    return _UNSAFE_CHARS.isdisjoint(text)


class _Cache:
    """Ids of segments, each encoded once: rows of one flat table."""

    def __init__(self, encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
                 dtype: np.dtype, max_entries: int):
        self._encode, self._dtype, self._max = encode, dtype, max_entries
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {}
        self._starts = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._table = np.zeros(0, self._dtype)

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all keys concatenated, ids per key)."""
        n = len(keys)
        rows = np.fromiter(map(self._index.get, keys, repeat(-1)), np.int64, n)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            # First sight, in order of appearance; only the missing positions are looked up again.
            new = list(dict.fromkeys(keys[i] for i in missing))
            if len(self._index) + len(new) > self._max:
                self._reset()
                return self.lookup(keys) if len(new) < self._max else self._uncached(keys)
            base = len(self._index)
            self._add(new)
            fresh = dict(zip(new, range(base, base + len(new))))
            rows[missing] = np.fromiter(map(fresh.__getitem__, (keys[i] for i in missing)),
                                        np.int64, len(missing))
        return self._gather(rows)

    def _uncached(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._encode(keys)

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return take_ranges(self._table, self._starts, self._lens, rows)

    def _add(self, new: list[str]) -> None:
        flat, lens = self._encode(new)
        base = len(self._index)
        self._index.update(zip(new, range(base, base + len(new))))
        starts = len(self._table) + np.concatenate([[0], np.cumsum(lens)[:-1]])
        self._starts = np.concatenate([self._starts, starts])
        self._lens = np.concatenate([self._lens, lens])
        self._table = np.concatenate([self._table, flat.astype(self._dtype, copy=False)])


def _run_patterns(bare: spm.SentencePieceProcessor) -> tuple[re.Pattern, re.Pattern]:
    """Segment regexes for ASCII documents and for others: optional whitespace, then a run of
    known letters, of other known characters, or of characters the vocabulary lacks (kept
    together: sentencepiece merges adjacent <unk>s). In the second, a word holding any
    non-ASCII character stays whole (its normal form and scripts are not checked here)."""
    unk = bare.unk_id()
    printable = [chr(c) for c in range(0x21, 0x7F)]
    unknown = {c for c in printable if unk in bare.encode(c)}
    letters = "".join(c for c in printable if c.isalpha() and c not in unknown)
    others = "".join(c for c in printable if not c.isalpha() and c not in unknown)
    runs = [f"[{re.escape(chars)}]+" for chars in (letters, others, "".join(sorted(unknown)))
            if chars]
    ascii_runs = "|".join(runs)
    # Possessive: an ASCII-only word fails the first branch without backtracking.
    mixed = r"[!-~]*+[^\x00-\x7f][^ \t\n\r]*|" + ascii_runs
    return (re.compile(f"[ \t\n\r]*(?:{ascii_runs})"), re.compile(f"[ \t\n\r]*(?:{mixed})"))


def _pieces(text: str) -> Iterator[str]:
    """`text` cut just before whitespace into pieces of about PIECE_CHARS characters."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        m = _WS_CHAR.search(text, start + PIECE_CHARS)
        if m is None:
            break
        yield text[start:m.start()]
        start = m.start()
    yield text[start:] if start else text


def _batches(texts: list[str]) -> Iterator[tuple[list[int], list[str]]]:
    """(owning document of each piece, pieces) in batches of about PIECE_CHARS characters."""
    owners: list[int] = []
    batch: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        for piece in _pieces(text):
            if batch and size + len(piece) > PIECE_CHARS:
                yield owners, batch
                owners, batch, size = [], [], 0
            owners.append(i)
            batch.append(piece)
            size += len(piece)
    if batch:
        yield owners, batch


@dataclass(frozen=True)
class EncoderPlan:
    """What an Encoder needs besides the model, worked out once (reading the model's pieces
    takes ~50 ms at 32k) and handed to every worker."""

    word_cache: bool
    fine_split: bool
    bare_model: bytes | None  # the model without the dummy prefix, for runs inside words

    @classmethod
    def of(cls, model: bytes, word_cache: bool | None = None,
           fine_split: bool | None = None) -> "EncoderPlan":
        words_exact, runs_exact = exact_caches(model)
        word_cache = words_exact if word_cache is None else word_cache
        fine_split = word_cache and (runs_exact if fine_split is None else fine_split)
        bare = None
        if fine_split:
            proto = _proto(model)
            proto.normalizer_spec.add_dummy_prefix = False
            bare = proto.SerializeToString()
        return cls(word_cache, fine_split, bare)


class Encoder:
    """Encodes batches of documents to one flat id array plus per-document lengths."""

    def __init__(self, model: bytes, num_threads: int = 1, word_cache: bool | None = None,
                 fine_split: bool | None = None, cache_entries: int = CACHE_ENTRIES,
                 plan: EncoderPlan | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.dtype = np.dtype(token_dtype(self.sp.get_piece_size()))
        self.num_threads = num_threads
        plan = plan or EncoderPlan.of(model, word_cache, fine_split)
        self.word_cache, self.fine_split = plan.word_cache, plan.fine_split
        self._words = _Cache(self._encode_words if self.fine_split else self._encode_list,
                             self.dtype, cache_entries)
        if self.fine_split:
            self._bare = spm.SentencePieceProcessor(model_proto=plan.bare_model)
            self._runs = _Cache(self._encode_runs, self.dtype, cache_entries)
            self._ascii_runs, self._mixed_runs = _run_patterns(self._bare)

    def _flat(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), self.dtype, int(lens.sum())), lens

    def _encode_list(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._flat(self.sp.encode(texts, num_threads=self.num_threads))

    def _encode_words(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Words by their runs, each run's ids from the run cache."""
        is_ascii = np.fromiter(map(str.isascii, words), bool, len(words))
        groups = []
        for mask, pattern in ((is_ascii, self._ascii_runs), (~is_ascii, self._mixed_runs)):
            idx = np.flatnonzero(mask)
            if len(idx):
                groups.append((idx, *self._word_runs([words[i] for i in idx], pattern)))
        return _merge(len(words), groups, self.dtype)

    def _word_runs(self, words: list[str], pattern: re.Pattern) -> tuple[np.ndarray, np.ndarray]:
        """One regex pass over the words joined by spaces; each run goes to the word holding
        its last character (an empty word holds none)."""
        runs = pattern.findall(" " + " ".join(words))
        # Runs repeat a lot (brackets, `self`): look each distinct one up once.
        coded = pc.dictionary_encode(pa.array(runs, pa.large_string()))
        table, lens_d = self._runs.lookup(coded.dictionary.to_pylist())
        ids, run_tokens = _take_distinct(table, lens_d,
                                         coded.indices.to_numpy(zero_copy_only=False))
        run_last = np.cumsum(np.fromiter(map(len, runs), np.int64, len(runs))) - 1
        spans = np.fromiter(map(len, words), np.int64, len(words)) + 1
        word_starts = np.cumsum(spans) - spans
        owner = np.searchsorted(word_starts, run_last, side="right") - 1
        return ids, np.bincount(owner, run_tokens, len(words)).astype(np.int64)

    def _encode_runs(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A key with leading whitespace starts a word (gets the space marker); one without
        continues the previous run of its word."""
        starts = [i for i, k in enumerate(keys) if k[0] in _WS]
        inner = [i for i, k in enumerate(keys) if k[0] not in _WS]
        out: list[list[int]] = [[] for _ in keys]
        for i, ids in zip(starts, self.sp.encode([keys[i].lstrip(_WS) for i in starts])):
            out[i] = ids
        for i, ids in zip(inner, self._bare.encode([keys[i] for i in inner])):
            out[i] = ids
        return self._flat(out)

    def _mode(self, text: str) -> int:
        return _WORDS if self.word_cache and cache_safe(text) else _PLAIN

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids of all documents concatenated, number of ids per document)."""
        modes = [self._mode(t) for t in texts]
        groups = []
        for mode in (_PLAIN, _WORDS):
            idx = [i for i, m in enumerate(modes) if m == mode]
            if idx:
                groups.append((idx, *self._encode_group(mode, [texts[i] for i in idx])))
        return _merge(len(texts), groups, self.dtype)

    def _encode_group(self, mode: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if mode == _PLAIN:
            return self._encode_list(texts)
        # Long documents in pieces cut before whitespace: a piece then starts a word, which
        # is exactly how the cached segmentation treats a document start. Batches of about
        # PIECE_CHARS characters bound the per-token index arrays below.
        parts_ids, lens = [], np.zeros(len(texts), np.int64)
        for owners, batch in _batches(texts):
            ids, per_piece = self._segments(batch)
            parts_ids.append(ids)
            np.add.at(lens, owners, per_piece)
        return (np.concatenate(parts_ids) if parts_ids else np.zeros(0, self.dtype)), lens

    def _segments(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cached ids of cache-safe documents. Splitting and finding each distinct word run in
        Arrow's C++ kernels; Python touches only the distinct words (ASCII whitespace is all the
        whitespace a cache-safe document holds, and it never occurs inside a UTF-8 sequence)."""
        words = pc.ascii_split_whitespace(pa.array(texts, pa.large_string()))
        per_doc = np.diff(words.offsets.to_numpy())
        coded = pc.dictionary_encode(words.flatten())
        table, lens_d = self._words.lookup(coded.dictionary.to_pylist())
        ids, lens = _take_distinct(table, lens_d, coded.indices.to_numpy(zero_copy_only=False))
        ends = np.cumsum(lens)
        tok_ends = np.concatenate([[0], ends])[np.cumsum(per_doc)]
        return ids, np.diff(np.concatenate([[0], tok_ends]))


def take_ranges(table: np.ndarray, starts: np.ndarray, lens_d: np.ndarray, which: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated ranges, their lengths) for rows `which` of ranges `table[starts:+lens_d]`,
    with one vectorised index."""
    lens = lens_d[which]
    ends = np.cumsum(lens)
    # Output position k takes table[start(key) + (k - first output position of key)].
    gather = np.repeat(starts[which] - (ends - lens), lens) + np.arange(
        int(ends[-1]) if len(ends) else 0)
    return table[gather], lens


def _take_distinct(table: np.ndarray, lens_d: np.ndarray, which: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`take_ranges` for distinct keys whose ids are concatenated in order in `table`."""
    return take_ranges(table, np.cumsum(lens_d) - lens_d, lens_d, which)


def _merge(n: int, groups: list, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Put encoded subsets (doc indices, ids, lens) back into document order."""
    lens = np.zeros(n, np.int64)
    for idx, _, glens in groups:
        lens[idx] = glens
    if len(groups) == 1:
        return groups[0][1].astype(dtype, copy=False), lens
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    out = np.empty(int(lens.sum()), dtype)
    for idx, gids, glens in groups:
        gends = np.cumsum(glens)
        pos = np.repeat(starts[idx] - (gends - glens), glens) + np.arange(int(gends[-1]) if len(
            gends) else 0)
        out[pos] = gids
    return out, lens
