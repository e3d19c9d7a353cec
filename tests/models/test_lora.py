"""LoRA from outside the model: B = 0 starts at the base model, merged weights reproduce the LoRA
model, only adapters train, adapters alone are a real safetensors file."""

from __future__ import annotations

import json

import pytest
import torch

from megalm.config import validate_tree
from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from megalm.models.lora import LoraConfig, apply_lora, is_adapter, merge_lora_items
from megalm.train.sft import adapter_files

CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, bias=True)
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _pair(targets=ALL, rank=4, alpha=8.0):
    torch.manual_seed(0)
    base = LLM(LLMConfig(**CFG)).double()
    lora_model = LLM(LLMConfig(**CFG)).double()
    lora_model.load_state_dict(base.state_dict())
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=list(targets))
    apply_lora(lora_model, cfg)
    return base, lora_model.double(), cfg


def test_zero_b_starts_at_the_base_model_and_only_adapters_train():
    base, lm, cfg = _pair()
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(base(x), lm(x))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * len(ALL) * CFG["n_layers"]
    # one optimizer step moves adapters only
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.clone() for n, p in lm.named_parameters()}
    lm(x, labels=x).backward()
    opt.step()
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".lora_A") or n.endswith(".lora_B") for n in changed)
    assert any(n.endswith(".lora_B") for n in changed)


def test_merged_weights_equal_the_lora_model():
    base, lm, cfg = _pair(targets=["wq", "wo", "w2"])
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.05)
    x = torch.randint(0, 64, (2, 16))
    merged = LLM(LLMConfig(**CFG)).double()
    seen = []

    def items():
        for name, t in lm.state_dict().items():
            seen.append(name)
            yield name, t

    merged.load_state_dict(dict(merge_lora_items(items(), cfg)), strict=True)
    assert torch.allclose(merged(x), lm(x), atol=1e-12)
    assert not torch.allclose(merged(x), base(x), atol=1e-4)
    assert len(seen) == len(lm.state_dict())


def test_merge_names_a_module_with_missing_parts():
    _, lm, cfg = _pair(targets=["wq"])
    items = [(n, t) for n, t in lm.state_dict().items() if not n.endswith("layers.1.attention.wq.lora_B")]
    with pytest.raises(UserError, match=r"layers\.1\.attention\.wq: found only base\.weight, lora_A"):
        list(merge_lora_items(items, cfg))


def test_adapters_alone_are_real_safetensors(tmp_path):
    from safetensors.torch import load_file

    _, lm, cfg = _pair(targets=["wv"])
    adapters = {n: p.detach() for n, p in lm.named_parameters() if is_adapter(n)}
    files = adapter_files(adapters, cfg, {"model_config": CFG})
    (tmp_path / "adapter.safetensors").write_bytes(files["adapter.safetensors"])
    back = load_file(str(tmp_path / "adapter.safetensors"))
    assert back.keys() == adapters.keys()
    assert all(torch.equal(back[n], adapters[n].float()) for n in adapters)
    conf = json.loads(files["adapter_config.json"])
    assert conf["rank"] == 4 and conf["targets"] == ["wv"] and conf["scale"] == 2.0


@pytest.mark.parametrize("lora, error", [
    (LoraConfig(rank=-1), r"lora\.rank: expected an integer >= 0"),
    (LoraConfig(rank=4, targets=["q_proj"]), r"lora\.targets\[0\]: 'q_proj' is not a layer name"),
    (LoraConfig(rank=4, alpha=0), r"lora\.alpha"),
    (LoraConfig(rank=4, dropout=1.0), r"lora\.dropout"),
])
def test_bad_lora_settings_name_the_key(lora, error):
    with pytest.raises(UserError, match=error):
        validate_tree(lora, "run.yaml", "lora")


def test_target_missing_from_the_model_is_named():
    model = LLM(LLMConfig(**{**CFG, "mlp": "gelu"}))
    with pytest.raises(UserError, match=r"lora\.targets: w3 match no layer"):
        apply_lora(model, LoraConfig(rank=2, targets=["wq", "w3"]))
