"""Presets build to the published parameter counts; bad preset files fail with file:line and key."""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.llm import LLM
from megalm.models.presets import load_preset, preset_names

# Published counts (GPT-2 as in HF/nanoGPT with the tied head counted once; Llama from Meta's
# released checkpoints).
COUNTS = {
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
}


def meta_model(name: str) -> LLM:
    with torch.device("meta"):
        return LLM(load_preset(name))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_preset_parameter_count(name):
    assert meta_model(name).num_params() == COUNTS[name]


def test_all_presets_listed_and_tiny_is_a_cpu_model():
    assert set(preset_names()) == set(COUNTS) | {"tiny"}
    cfg = load_preset("tiny")
    assert cfg.vocab_size == 8000 and cfg.max_seq_len == 256
    model = LLM(cfg)
    assert 1_000_000 <= model.num_params() <= 3_000_000
    ids = torch.randint(0, 8000, (2, 32))
    loss = model(ids, labels=ids)
    assert torch.isfinite(loss)


def test_flops_per_token_is_palm_formula():
    # GPT-2 124M, as nanoGPT's estimate_mfu counts it: N excludes the position table only.
    n = 124_439_808 - 1024 * 768
    assert meta_model("gpt2-124m").flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    # Llama 2 7B: untied, so the input embedding (a lookup) is excluded and the head included.
    n = 6_738_415_616 - 32000 * 4096
    assert meta_model("llama2-7b").flops_per_token(4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("vocab_size: 100\ndim: 16\nn_layers: 1\nn_heads: 2\nnorm_eps: 1e-6\n")
    cfg = load_preset(path)
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.norm_eps) == (100, 2, 1e-6)
    assert load_preset("tiny", {"n_layers": 2, "activation_checkpointing": 1}).n_layers == 2
    with pytest.raises(UserError, match=r"overrides.*layers: unknown key"):
        load_preset("tiny", {"layers": 2})


def test_unknown_key_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vocab_size: 100\ndim: 16\nn_layer: 1\nn_heads: 2\n")
    with pytest.raises(UserError, match=rf"^{path}:3: n_layer: unknown key"):
        load_preset(path)


def test_bad_value_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vocab_size: 100\ndim: 16\nn_layers: 1\nn_heads: 3\n")
    with pytest.raises(UserError, match=rf"^{path}: n_heads: must divide dim=16"):
        load_preset(path)


def test_bad_yaml_unknown_preset_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("vocab_size: 100\ndim: [16\n")
    with pytest.raises(UserError, match=rf"^{path}:\d+: invalid YAML"):
        load_preset(path)
    with pytest.raises(UserError, match=r"model preset 'llama9'.*tiny"):
        load_preset("llama9")
    with pytest.raises(UserError, match=r"not found"):
        load_preset(tmp_path / "absent.yaml")
