"""Test data with a real sentencepiece tokenizer: Python's own help text, tokenized, as a shard
directory per docs/interfaces.md (written by tests/data/shards.py, independent of data_prep)."""

from __future__ import annotations

import io
import os
import re

import numpy as np

from tests.data.shards import write_shard_dir


def _paragraphs(limit: int) -> list[str]:
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            if len(text) > 40:
                paras.append(text)
    return paras[:limit]


def make_corpus(out: str, vocab_size: int = 320, n_docs: int = 600) -> str:
    """Shard dir at `out` (reused if complete): `n_docs` train docs, 80 valid docs."""
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    import sentencepiece as spm

    paras = _paragraphs(n_docs + 80)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paras), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    docs = [np.asarray(ids, dtype=np.int64) for ids in sp.encode(paras)]
    tmp = out + ".tmp"
    write_shard_dir(tmp, {"train": docs[:n_docs], "valid": docs[n_docs:]}, vocab_size=vocab_size,
                    eos_id=2, tokenizer_bytes=model.getvalue())
    os.replace(tmp, out)
    return out


def make_blend_corpus(out: str) -> list[str]:
    """Two shard dirs sharing make_corpus's tokenizer: Python's help text (source 0) and the same
    paragraphs word-reversed (source 1: the same tokens in another order, so its loss differs)."""
    base = make_corpus(os.path.join(out, "help"))
    rev = os.path.join(out, "reversed")
    if not os.path.exists(os.path.join(rev, "manifest.json")):
        import sentencepiece as spm

        model = open(os.path.join(base, "tokenizer.model"), "rb").read()
        sp = spm.SentencePieceProcessor(model_proto=model)
        paras = [" ".join(reversed(p.split())) for p in _paragraphs(680)]
        docs = [np.asarray(ids, dtype=np.int64) for ids in sp.encode(paras)]
        write_shard_dir(rev + ".tmp", {"train": docs[:600], "valid": docs[600:]}, vocab_size=sp.vocab_size(),
                        eos_id=2, tokenizer_bytes=model)
        os.replace(rev + ".tmp", rev)
    return [base, rev]
