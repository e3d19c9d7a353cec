"""`megalm import-hf`: random Llama and GPT-2 models built and saved by transformers in the test,
imported, and loaded by megalm's checkpoint reader with logits equal to transformers'; the
imported checkpoint samples with its tokenizer and exports back to an equal HF model."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megalm.checkpoint.reader import load_model, load_tokenizer
from megalm.cli import main as megalm_main

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 123, 250, 3, 64, 11, 2]])


def hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def save(model, path, tokenizer_from: str | None) -> None:
    model.save_pretrained(path, max_shard_size="50KB")  # several shards + index
    if tokenizer_from:
        shutil.copy(os.path.join(tokenizer_from, "tokenizer.model"), path / "tokenizer.model")


def test_llama_import_loads_with_equal_logits_and_samples(trained, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    save(hf, tmp_path / "hf", trained["shards"])
    assert len([p for p in os.listdir(tmp_path / "hf") if p.endswith(".safetensors")]) > 1
    assert megalm_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    model, meta = load_model(str(tmp_path / "ck"))
    assert meta["data"]["model_config"]["rope_theta"] == 5000.0 and model.config.n_kv_heads == 2
    with torch.no_grad():
        assert (model(IDS) - hf_logits(hf)).abs().max().item() <= 1e-4
    assert load_tokenizer(meta).vocab_size() == 320
    capsys.readouterr()
    assert megalm_main(["sample", str(tmp_path / "ck"), "--prompt", "The list", "--max-new-tokens", "4",
                        "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The list")


def test_gpt2_import_and_export_round_trip(trained, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=320, n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-zero biases and norm shifts, so a misplaced one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save(hf, tmp_path / "hf", trained["shards"])
    assert megalm_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    model, _ = load_model(str(tmp_path / "ck"))
    assert (model.config.positions, model.config.norm, model.config.mlp, model.config.bias) == \
        ("learned", "layernorm", "gelu", True)
    with torch.no_grad():
        assert (model(IDS) - hf_logits(hf)).abs().max().item() <= 1e-4
    assert megalm_main(["export", str(tmp_path / "ck"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert (hf_logits(back) - hf_logits(hf)).abs().max().item() <= 1e-5
    assert back.generate(IDS[:, :4], max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist() == \
        hf.generate(IDS[:, :4], max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist()


def test_bias_free_gpt2_style_model_exports_with_zero_biases(tmp_path):
    """A megalm GPT-2-style model without biases: GPT2LMHeadModel always has them, so zeros."""
    from transformers import AutoModelForCausalLM

    from megalm.export.arch import to_hf
    from megalm.export.shards import write_sharded
    from megalm.export.arch import hf_config
    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM

    torch.manual_seed(2)
    cfg = LLMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, mlp="gelu", norm="layernorm",
                    positions="learned", max_seq_len=32, tie_embeddings=True, bias=False)
    model = LLM(cfg).eval()
    write_sharded(to_hf(iter(model.state_dict().items()), cfg, "gpt2"), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, "gpt2", "float32", {})))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = IDS[:, :10] % 64
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("edit, expect", [
    ({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]},
     "model_type 'gpt_neox' (architectures: GPTNeoXForCausalLM) is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters.rope_type is 'llama3'"),
])
def test_unsupported_architecture_is_one_line_and_writes_nothing(tmp_path, capsys, edit, expect):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2))
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()
    assert megalm_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expect in err, err
    assert sorted(os.listdir(tmp_path)) == ["hf"]
