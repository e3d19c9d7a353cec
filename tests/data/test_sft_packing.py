"""SFT packing: whole examples per row, each computed exactly as if it ran alone; labels only
where the loss mask says; every example once per epoch; exact positions for resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm.cli import main as cli
from megalm.data.loader import build_loader
from megalm.data.manifest import load_manifest
from megalm.data.sft import greedy_pack
from megalm.data.shards import open_split
from megalm.data.sources import DataConfig, Sources
from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from tests.distributed.corpus import make_corpus

SEQ = 160


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("sftpack")
    tok = make_corpus(str(base / "text"))
    src = base / "chat.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    with open(src, "w") as f:
        for n in range(40):  # lengths vary, a few longer than a row (truncated)
            f.write(json.dumps({"prompt": f"say {words[n % 10]} {n % 7} times",
                                "response": " ".join([words[n % 10]] * (n % 7 + 1) * (1 + 15 * (n % 13 == 0)))})
                    + "\n")
    out = base / "sft"
    assert cli(["prep", "--sft", str(src), "--tokenizer", tok, "-o", str(out), "--valid-fraction", "0"]) == 0
    return str(out)


def test_greedy_pack():
    assert greedy_pack(np.array([3, 3, 2, 5, 1]), 6).tolist() == [0, 2, 3, 5]
    assert greedy_pack(np.array([6, 6]), 6).tolist() == [0, 1, 2]


def test_rows_hold_whole_examples_once_per_epoch_with_masked_labels(sft_dir):
    src = Sources(DataConfig(paths=[sft_dir], seq_len=SEQ, seed=7), "train", kind="sft")
    ds = src.datasets[0]
    docs = open_split(load_manifest(sft_dir), "train")
    assert ds.truncated > 0
    seen = []
    for row in ds.windows(np.arange(len(ds))):
        for k in range(int(row.doc_ids.max()) + 1):
            sel = row.doc_ids == k
            if (row.labels[sel] == -100).all() and (row.input_ids[sel] == 0).all():
                continue  # padding
            assert row.position_ids[sel].tolist() == list(range(int(sel.sum())))
            # find the example: its first inputs identify it
            g = next(g for g in range(docs.documents)
                     if np.array_equal(docs.doc(g)[: sel.sum()], row.input_ids[sel]))
            n = int(sel.sum())
            tok, mask = docs.doc(g)[: n + 1].astype(np.int64), docs.doc_mask(g)[1: n + 1]
            assert row.labels[sel].tolist() == np.where(mask == 1, tok[1:], -100).tolist()
            seen.append(g)
    assert sorted(seen) == list(range(docs.documents))  # every example exactly once in an epoch


def test_packed_rows_compute_each_example_as_if_alone(sft_dir):
    torch.manual_seed(0)
    m = load_manifest(sft_dir)
    model = LLM(LLMConfig(vocab_size=m.tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          max_seq_len=SEQ)).double().eval()
    loader = build_loader(DataConfig(paths=[sft_dir], seq_len=SEQ, seed=3), 4, 4, kind="sft")
    batch = next(iter(loader))[0]
    assert batch["doc_ids"].max() >= 2  # several examples share a row
    logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    token_losses, count = [], 0
    for b in range(batch["input_ids"].shape[0]):
        for k in batch["doc_ids"][b].unique().tolist():
            sel = batch["doc_ids"][b] == k
            alone = model(batch["input_ids"][b][sel][None])[0]
            assert torch.allclose(logits[b][sel], alone, atol=1e-10, rtol=0)
            lab = batch["labels"][b][sel]
            token_losses.append(F.cross_entropy(alone, lab, ignore_index=-100, reduction="sum"))
            count += int((lab != -100).sum())
    packed = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
    assert torch.allclose(packed, torch.stack(token_losses).sum() / count, atol=1e-10)


def test_task_sft_refuses_text_shards(tmp_path):
    text = make_corpus(str(tmp_path / "text"))
    with pytest.raises(UserError, match=r"kind: 'text' shards, but this run reads 'sft'.*task lm"):
        build_loader(DataConfig(paths=[text], seq_len=SEQ), 4, 4, kind="sft")


def test_eval_batches_come_from_the_valid_split_in_order(tmp_path, sft_dir):
    from megalm.data.loader import build_eval_loader

    ev = build_eval_loader(DataConfig(paths=[sft_dir], seq_len=SEQ, eval_split="train"), 2, kind="sft")
    first, again = list(ev), list(ev)
    assert len(first) == len(ev) >= 1
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, again))  # fixed batches
    assert all((mb["labels"] != -100).any() for mb in first)
