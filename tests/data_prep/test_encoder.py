import io
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.encoder import UNSAFE_RANGES, Encoder, fine_split_is_exact, word_cache_is_exact

TRICKY = ["", "   ", "a  b\t\tc\n\nd", "naïve café", "x\u00a0y", "x\u00a8y z", "tab\there",
          "a\u2581b c", "日本語 テキスト", "ＦＵＬＬ width", "emoji 👍🏽 ok", "zero\u200bwidth",
          "ctrl\x1cchar", "line\u2028sep", " lead and trail "]


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


def _stdlib_sources(n_files: int, skip: int = 0) -> list[str]:
    """Real source code (the standard library's own files, sorted, deterministic)."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[skip:skip + n_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _train(lines, **kw) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out,
                                   minloglevel=2, **kw)
    return out.getvalue()


def _assert_same_as_sentencepiece(model: bytes, texts: list[str], **kw) -> Encoder:
    enc = Encoder(model, **kw)
    sp = spm.SentencePieceProcessor(model_proto=model)
    for batch in (texts[: len(texts) // 2], texts[len(texts) // 2:]):  # 2nd reuses the cache
        ids, lens = enc.encode(batch)
        want = sp.encode(batch)
        assert lens.tolist() == [len(w) for w in want]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        for i, w in enumerate(want):
            assert ids[offsets[i]:offsets[i + 1]].tolist() == w, repr(batch[i][:200])
    return enc


@pytest.mark.parametrize("model_type,byte_fallback", [("bpe", False), ("bpe", True),
                                                      ("unigram", False)])
def test_run_cache_on_source_code_equals_sentencepiece(model_type, byte_fallback):
    """Code (rarely repeated words) takes the run cache; rare ASCII characters the vocabulary
    lacks (low character_coverage) must still merge into one <unk> like sentencepiece's."""
    train_docs = _stdlib_sources(25)
    lines = [ln for d in train_docs for ln in d.splitlines() if ln.strip()]
    model = _train(lines, model_type=model_type, vocab_size=2000, character_coverage=0.99,
                   hard_vocab_limit=False, byte_fallback=byte_fallback)
    # Unigram ties are broken by float sums over the whole prefix: no cache is exact there.
    assert fine_split_is_exact(model) == (model_type == "bpe")
    sp = spm.SentencePieceProcessor(model_proto=model)
    rare = [c for c in "~^$|`@!" if len(sp.encode(c)) > 1 or sp.unk_id() in sp.encode(c)]
    assert rare, "want ASCII characters outside the vocabulary"
    texts = _stdlib_sources(40, skip=25) + TRICKY + ["J|~^ a|b ~~x", "é|é a\u00e9b"]
    enc = _assert_same_as_sentencepiece(model, texts)
    assert enc.fine_split == enc.word_cache == (model_type == "bpe")


def test_long_documents_in_pieces_and_cache_reset(monkeypatch, model_path):
    import data_prep.encoder as encoder

    monkeypatch.setattr(encoder, "PIECE_CHARS", 500)
    texts = _stdlib_sources(6) + ["x" * 2000 + " tail", "   lead " * 300]
    _assert_same_as_sentencepiece(model_path.read_bytes(), texts, cache_entries=300)


def test_user_defined_symbols_keep_words_whole(docs):
    lines = [ln for d in docs[:300] for ln in d.splitlines() if ln.strip()]
    model = _train(lines, model_type="bpe", vocab_size=600, user_defined_symbols=["<|x|>"])
    assert word_cache_is_exact(model) and not fine_split_is_exact(model)
    _assert_same_as_sentencepiece(model, docs[300:500] + ["a<|x|>b <|x|>", "<|x|>."])
