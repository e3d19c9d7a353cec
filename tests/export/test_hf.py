"""`megalm export --format hf` verified by transformers itself: from_pretrained on exports of a
ZeRO-3, a 2-stage pipeline and a tensor-parallel (2 ranks, ZeRO-2) checkpoint, fp32 logits within 1e-4 of megalm's, 32 greedy tokens
identical, AutoTokenizer ids identical to sentencepiece's, sharded safetensors + index."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megalm.models.load import load_model, load_tokenizer
from megalm.cli import main as megalm_main
from megalm.export.source import CheckpointTensors

SAMPLE = ("The list of items is returned by the function; each item names a built-in type.  "
          "Numbers 1234, \u00e9l\u00e8ve na\u00efve, tabs\tand\nlines.")


@pytest.fixture(scope="module", params=["zero3", "pp2", "tp2"])
def exported(request, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / request.param
    assert megalm_main(["export", trained[request.param], "--format", "hf", "--out", str(out),
                        "--max-shard-size", "100KB"]) == 0
    model, meta = load_model(trained[request.param])
    return request.param, out, model, meta


def test_layout_is_sharded_safetensors_with_index(exported):
    _, out, _, _ = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == shards
    assert not [p for p in os.listdir(out.parent) if p.startswith(".tmp-")]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    card = (out / "README.md").read_text()
    assert "| training steps | 2 |" in card and "| training tokens |" in card and "| last training loss | " in card


def test_transformers_logits_and_greedy_match_megalm(exported):
    from transformers import AutoModelForCausalLM

    _, out, model, meta = exported
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(meta).encode(SAMPLE)])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = ids[:, :8]
    ours = model.generate(prompt, 32, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert theirs.shape[1] == 8 + 32 and ours.tolist() == theirs.tolist()


def test_autotokenizer_ids_equal_sentencepiece(exported):
    from transformers import AutoTokenizer

    _, out, _, meta = exported
    tok = AutoTokenizer.from_pretrained(out)
    sp = load_tokenizer(meta)
    assert tok(SAMPLE, add_special_tokens=False)["input_ids"] == sp.encode(SAMPLE)
    assert tok.eos_token_id == sp.eos_id()


def test_streamed_tensors_equal_the_consolidated_model(exported, trained):
    name, _, model, _ = exported
    src = CheckpointTensors(trained[name], release_bytes=1)  # drop the mappings after every tensor
    assert src.layout == {"zero3": "zero3", "pp2": "pipeline", "tp2": "zero12"}[name]
    items = list(src.items())
    ref = model.state_dict()
    assert [n for n, _ in items] == list(ref)
    assert all(torch.equal(t.float(), ref[n]) for n, t in items)


@pytest.mark.parametrize("run", ["zero2-frozen", "zero3-frozen"])
def test_frozen_parameters_stream_from_their_fragments(trained, run):
    """Frozen weights (LoRA's base) sit outside ZeRO's flat partitions; they still stream, unchanged
    from their initial values, in state-dict order."""
    from tests.export.jobs import FROZEN

    model, _ = load_model(trained[run])
    src = CheckpointTensors(trained[run])
    items = dict(src.items())
    assert list(items) == list(model.state_dict())
    assert all(torch.equal(items[n].float(), t) for n, t in model.state_dict().items())
    assert torch.equal(items["norm.weight"], torch.ones_like(items["norm.weight"]))  # frozen at its init
    assert set(FROZEN) <= set(items)


def test_bf16_run_exports_bf16_by_default(trained, tmp_path):
    """A bf16 run (ZeRO-1, DeepSpeed's bf16_* files) exports its fp32 master weights rounded to bf16;
    transformers computes megalm's logits from them."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert megalm_main(["export", trained["zero1-bf16"], "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, meta = load_model(trained["zero1-bf16"])
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16 and torch.equal(embed, model.tok_embeddings.weight.bfloat16())
    model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(meta).encode(SAMPLE)])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
