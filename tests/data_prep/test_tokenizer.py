import hashlib
import io

import pytest
import sentencepiece as spm

from data_prep import tokenizer
from data_prep.encoder import word_cache_is_exact
from data_prep.tokenizer import TokenizerSpec
from megalm.errors import UserError


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
    assert not word_cache_is_exact(model)  # unigram: see data_prep/encoder.py


def test_load_rejects_non_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="bad.model: not a sentencepiece model"):
        tokenizer.load_bytes(bad)
    with pytest.raises(UserError, match="cannot read"):
        tokenizer.load_bytes(tmp_path / "missing.model")
