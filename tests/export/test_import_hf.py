"""`megalm import-hf`: random Llama and GPT-2 models built and saved by transformers in the test,
imported, and loaded by megalm's checkpoint reader with logits equal to transformers'; the
imported checkpoint samples with its tokenizer, exports back to an equal HF model, and finetunes
(SFT, full and LoRA) from its weights."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megalm.models.load import load_model, load_tokenizer
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


def model_overrides(model_config: dict) -> list[str]:
    """`model.KEY=VALUE` for every recorded model field: a run shaped exactly like the import."""
    return [f"model.{k}={json.dumps(v)}" for k, v in model_config.items() if v is not None]


def test_sft_and_lora_from_an_imported_llama(trained, tmp_path):
    """import-hf -> prep --sft --tokenizer <imported> -> task: sft with init_from=<imported>, full and
    LoRA under ZeRO-3 on 2 ranks: step 1's loss is the imported model's loss on step 1's batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megalm.train.config import load_config
    from megalm.train.task import build_task
    from tests.distributed.helper import run_distributed
    from tests.train.sft_jobs import sft_overrides

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                      tie_word_embeddings=False))
    save(hf, tmp_path / "hf", trained["shards"])
    ck = str(tmp_path / "ck")
    assert megalm_main(["import-hf", str(tmp_path / "hf"), "--out", ck]) == 0
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Name item {n}", "response": f"item {n} is {n * 7}"}) + "\n"
                           for n in range(24)))
    sft = str(tmp_path / "sft")
    assert megalm_main(["prep", "--sft", str(src), "--tokenizer", ck, "-o", sft]) == 0
    imported, meta = load_model(ck)
    overrides = sft_overrides(sft, "x", 2, ck, ["parallel.zero_stage=3", *model_overrides(meta["data"]["model_config"]),
                                                "data.seq_len=48"])
    runs = run_distributed("tests.export.jobs:sft_from_import", {"workdir": str(tmp_path), "overrides": overrides},
                           nproc=2)[0]
    # The first step's micro-batches of both ranks, through the imported model: the mean is step 1's loss.
    task = build_task(load_config(None, overrides, world_size=2))
    with torch.no_grad():
        want = torch.stack([task.loss(imported, mb) for rank in range(2)
                            for mb in next(iter(task.build_loader("train", rank, 2)))]).mean().item()
    for name in ("full", "lora"):
        assert runs[name]["step"] == 2 and len(runs[name]["losses"]) == 2, runs[name]
        assert abs(runs[name]["losses"][0] - want) <= 1e-5 * want, (name, runs[name]["losses"], want)
    assert runs["full"]["losses"][1] != runs["lora"]["losses"][1]  # the two runs trained differently


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
