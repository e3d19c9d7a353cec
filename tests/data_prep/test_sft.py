"""`megalm prep --sft`: masks line up with the rendered text exactly, manifest kind sft, bad input
is one line naming file:line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.chat import ChatTemplate, encode_example, parse_example
from megalm.cli import main as cli
from megalm.data.manifest import load_manifest
from megalm.data.shards import open_split
from megalm.data.sources import DataConfig, Sources
from megalm.errors import UserError


@pytest.fixture(scope="module")
def sp(model_path):
    return spm.SentencePieceProcessor(model_file=str(model_path))


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_prompt_response_mask_is_exactly_the_response_and_eos(sp):
    t = ChatTemplate()
    turns = parse_example({"prompt": "What is a list?", "response": "A mutable sequence."}, "x:1")
    ids, mask = encode_example(sp, t, turns, sp.eos_id())
    # one call over the whole rendered text, then EOS: the tokens a model sees at inference
    assert ids == sp.encode(t.prompt(turns[:1]) + "A mutable sequence.") + [sp.eos_id()]
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained[-1] == sp.eos_id()
    assert sp.decode(trained[:-1]) == "A mutable sequence."
    assert sp.decode([i for i, m in zip(ids, mask) if not m]) == sp.decode(sp.encode(t.prompt(turns[:1])))
    assert mask[0] == 0 and len(ids) == len(mask)


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(sp):
    t = ChatTemplate(assistant_suffix="\n")
    turns = parse_example({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a number"},
        {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "dropped: nothing follows"}]}, "x:1")
    ids, mask = encode_example(sp, t, turns, sp.eos_id())
    eos = [k for k, i in enumerate(ids) if i == sp.eos_id()]
    assert len(eos) == 2 and eos[-1] == len(ids) - 1 and all(mask[k] for k in eos)
    first, second = ids[: eos[0]], ids[eos[0] + 1: eos[1]]
    m1, m2 = mask[: eos[0]], mask[eos[0] + 1: eos[1]]
    assert sp.decode([i for i, m in zip(first, m1) if m]) == "Hello."
    assert sp.decode([i for i, m in zip(second, m2) if m]) == "Seven."
    assert "Name a number" in sp.decode([i for i, m in zip(second, m2) if not m])
    assert "dropped" not in sp.decode(ids)


def test_prep_writes_sft_shards_the_loader_reads(tmp_path, model_path, sp):
    src = _write(tmp_path / "chat.jsonl", [{"prompt": f"Count to {n}", "response": " ".join(map(str, range(n)))}
                                           for n in range(1, 30)])
    out = tmp_path / "out"
    assert cli(["prep", "--sft", src, "--tokenizer", str(model_path), "-o", str(out), "--valid-fraction", "0.2"]) == 0
    m = load_manifest(str(out))
    assert m.kind == "sft" and m.splits["valid"].documents > 0
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["sft"]["template"] == ChatTemplate().to_dict()
    docs = open_split(m, "train")
    total = 0
    for g in range(docs.documents):
        toks, mask = docs.doc(g), docs.doc_mask(g)
        assert mask.dtype == np.uint8 and toks[-1] == sp.eos_id() and mask[-1] == 1
        text = sp.decode(toks[mask.astype(bool)][:-1].tolist())
        assert text.split(" ")[0] == "0"  # every response counts from 0
        total += 1
    assert total == m.splits["train"].documents
    # the pretraining loader refuses instruction shards, naming the directory and the task
    with pytest.raises(UserError, match=r"manifest.json: kind: 'sft' shards.*task sft"):
        Sources(DataConfig(paths=[str(out)], seq_len=16), "train")
    # a second run without --overwrite refuses to replace it
    assert cli(["prep", "--sft", src, "--tokenizer", str(model_path), "-o", str(out)]) == 2


@pytest.mark.parametrize("line, error", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response"', r"chat\.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', r"chat\.jsonl:1: response: expected a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"chat\.jsonl:1: messages\[0\]: expected"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"chat\.jsonl:1: messages: no assistant turn"),
    ('[1, 2]', r"chat\.jsonl:1: expected a JSON object"),
])
def test_bad_line_is_one_line_naming_file_and_line(tmp_path, model_path, line, error, capsys):
    src = tmp_path / "chat.jsonl"
    src.write_text(line + "\n")
    out = tmp_path / "out"
    assert cli(["prep", "--sft", str(src), "--tokenizer", str(model_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(error, err), err
    assert not (out / "manifest.json").exists()


def test_chat_template_from_yaml(tmp_path, model_path, sp):
    tpl = tmp_path / "tpl.yaml"
    tpl.write_text("user_prefix: 'Q: '\nassistant_prefix: ' A: '\n")
    src = _write(tmp_path / "c.jsonl", [{"prompt": "two plus two", "response": "four"}])
    out = tmp_path / "out"
    assert cli(["prep", "--sft", src, "--tokenizer", str(model_path), "-o", str(out), "--valid-fraction", "0",
                "--chat-template", str(tpl)]) == 0
    docs = open_split(load_manifest(str(out)), "train")
    assert docs.doc(0)[:-1].tolist() == sp.encode("Q: two plus two\n A: four")
    tpl.write_text("user_prefx: 'Q: '\n")
    with pytest.raises(UserError, match=r"tpl\.yaml: user_prefx: unknown key"):
        ChatTemplate.load(str(tpl))


def test_builtin_topics_qa_needs_no_download(tmp_path, model_path):
    out = tmp_path / "qa"
    assert cli(["prep", "--sft", "builtin:python-topics-qa", "--tokenizer", str(model_path), "-o", str(out)]) == 0
    m = load_manifest(str(out))
    assert m.splits["train"].documents + m.splits["valid"].documents >= 50


def test_verify_checks_the_loss_mask(tmp_path, model_path, capsys):
    import pyarrow as pa

    src = _write(tmp_path / "c.jsonl", [{"prompt": "p", "response": f"r {n}"} for n in range(5)])
    out = tmp_path / "out"
    assert cli(["prep", "--sft", src, "--tokenizer", str(model_path), "-o", str(out), "--valid-fraction", "0"]) == 0
    assert cli(["prep", "--verify", str(out)]) == 0
    # a shard whose mask rows are shorter than its token rows, with a manifest that matches its bytes
    shard = out / "train-00000.arrow"
    with pa.memory_map(str(shard)) as f:
        table = pa.ipc.open_file(f).read_all()
    masks = pa.array([m[:-1] for m in table.column("loss_mask").to_pylist()], pa.list_(pa.uint8()))
    bad = pa.table({"tokens": table.column("tokens"), "loss_mask": masks})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, bad.schema) as writer:
        writer.write_table(bad)
    blob = sink.getvalue().to_pybytes()
    shard.write_bytes(blob)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    entry.update(bytes=len(blob), sha256=__import__("hashlib").sha256(blob).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli(["prep", "--verify", str(out)]) == 1
    assert "loss_mask rows differ in length from the tokens rows" in capsys.readouterr().out
