import hashlib
import io
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import tokenizer
from data_prep.tokenizer import UNSAFE_RANGES, Encoder, TokenizerSpec, word_cache_is_exact
from megalm.errors import UserError

TRICKY = ["", "   ", "a  b\t\tc\n\nd", "naïve café", "x\u00a0y", "x\u00a8y z", "tab\there",
          "a\u2581b c", "日本語 テキスト", "ＦＵＬＬ width", "emoji 👍🏽 ok", "zero\u200bwidth",
          "ctrl\x1cchar", "line\u2028sep", " lead and trail "]


def test_training_is_deterministic_and_ids_fixed(docs, model_path):
    lines = [line for d in docs[:1500] for line in d.splitlines() if line.strip()]
    again = tokenizer.train(lines, TokenizerSpec(vocab_size=500))
    assert hashlib.sha256(again).digest() == hashlib.sha256(model_path.read_bytes()).digest()
    info = tokenizer.describe(again)
    assert (info["pad_id"], info["bos_id"], info["eos_id"], info["unk_id"]) == (0, 1, 2, 3)
    assert info["vocab_size"] == 500


def test_special_tokens_and_byte_fallback(docs):
    lines = [line for d in docs[:150] for line in d.splitlines() if line.strip()]
    model = tokenizer.train(lines, TokenizerSpec("unigram", 700, True, ("<|im_start|>",)))
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.piece_to_id("<|im_start|>") == 4
    assert tokenizer.describe(model)["special_tokens"] == {"<|im_start|>": 4}
    assert sp.piece_to_id("<0xE2>") != sp.unk_id()  # byte pieces exist
    assert word_cache_is_exact(model)


def test_load_rejects_non_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="bad.model: not a sentencepiece model"):
        tokenizer.load_bytes(bad)
    with pytest.raises(UserError, match="cannot read"):
        tokenizer.load_bytes(tmp_path / "missing.model")


def test_word_cache_equals_plain_encode(docs, model_path):
    model = model_path.read_bytes()
    cached, plain = Encoder(model), Encoder(model, word_cache=False)
    assert cached.word_cache and not plain.word_cache
    texts = docs + TRICKY
    for batch in (texts[:1000], texts[1000:]):  # second batch reuses the first batch's cache
        got_ids, got_lens = cached.encode(batch)
        want_ids, want_lens = plain.encode(batch)
        assert np.array_equal(got_lens, want_lens)
        assert np.array_equal(got_ids, want_ids)
        assert got_ids.dtype == np.uint16
    # And against sentencepiece itself, document by document.
    sp = spm.SentencePieceProcessor(model_proto=model)
    ids, lens = cached.encode(TRICKY)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    for i, text in enumerate(TRICKY):
        assert ids[offsets[i]:offsets[i + 1]].tolist() == sp.encode(text), repr(text)


def test_unsafe_ranges_cover_every_disagreement(model_path):
    """Recompute the table from unicodedata, and check with the model's own normaliser that no
    character outside it turns into (or out of) a space."""
    unsafe = np.zeros(0x110000, bool)
    for a, b in UNSAFE_RANGES:
        unsafe[a:b + 1] = True
    sp = spm.SentencePieceProcessor(model_proto=model_path.read_bytes())
    safe = [chr(c) for c in range(0x110000)
            if not unsafe[c] and not 0xD800 <= c < 0xE000 and chr(c) not in " \t\n\r"]
    for ch in safe:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs") or any(
                x.isspace() for x in unicodedata.normalize("NFKC", ch)):
            raise AssertionError(f"U+{ord(ch):04X} is missing from UNSAFE_RANGES")
    normalized = sp.normalize(["a" + ch + "b" for ch in safe])
    spaced = [f"U+{ord(ch):04X}" for ch, n in zip(safe, normalized) if "\u2581" in n[1:]]
    assert not spaced, spaced[:20]


def test_cache_disabled_when_pieces_may_cross_spaces(docs):
    lines = [line for d in docs[:100] for line in d.splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out,
                                   model_type="bpe", vocab_size=300, split_by_whitespace=False,
                                   minloglevel=2)
    assert not word_cache_is_exact(out.getvalue())
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out,
                                   model_type="bpe", vocab_size=300,
                                   normalization_rule_name="identity", minloglevel=2)
    assert not word_cache_is_exact(out.getvalue())
    assert not Encoder(out.getvalue()).word_cache
