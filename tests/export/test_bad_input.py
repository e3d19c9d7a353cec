"""Bad input to `megalm export`: one `error:` line naming what is wrong, exit status 2, and no
output folder (or temporary leftover) behind."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from megalm.cli import main as megalm_main
from megalm.errors import UserError
from megalm.export.arch import architecture
from megalm.models.config import LLMConfig


def one_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert megalm_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def nothing_written(parent) -> bool:
    return not [p for p in os.listdir(parent) if p == "out" or p.startswith(".tmp-")]


def test_corrupt_shard_is_named(trained, tmp_path, capsys):
    step = sorted(p for p in os.listdir(os.path.join(trained["zero3"], "checkpoints")) if p.startswith("step_"))[-1]
    bad = tmp_path / "ck" / step
    shutil.copytree(os.path.join(trained["zero3"], "checkpoints", step), bad)
    victim = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    for fmt in ("hf", "gguf"):
        line = one_error(capsys, ["export", str(bad), "--format", fmt, "--out", str(tmp_path / "out")])
        assert "checksum mismatch in zero_pp_rank_1_mp_rank_00_optim_states.pt" in line and str(bad) in line, line
        assert nothing_written(tmp_path)


def test_unknown_format_and_dtype(trained, tmp_path, capsys):
    line = one_error(capsys, ["export", trained["zero3"], "--format", "onnx", "--out", str(tmp_path / "out")])
    assert line == "error: --format: unknown format 'onnx'; expected one of hf, gguf, diffusers"
    line = one_error(capsys, ["export", trained["zero3"], "--format", "hf", "--dtype", "int4", "--out",
                              str(tmp_path / "out")])
    assert "--dtype: expected fp32, bf16 or fp16, got 'int4'" in line
    assert nothing_written(tmp_path)


def test_existing_output_is_not_overwritten(trained, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = one_error(capsys, ["export", trained["pp2"], "--format", "hf", "--out", str(tmp_path / "out")])
    assert "already exists and is not empty (pass --overwrite" in line
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_tokenizer_mismatch_is_refused(trained, tmp_path):
    """A sentencepiece option the Hugging Face rebuild does not reproduce (pieces that end in the
    space marker) is caught by the id check, before anything is published."""
    import sentencepiece as spm

    from megalm.export.outdir import staged_dir
    from megalm.export.tokenizer import SpmModel, write_hf_tokenizer
    from tests.distributed.corpus import _paragraphs

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_paragraphs(300)), model_writer=model, vocab_size=200,
                                   model_type="bpe", treat_whitespace_as_suffix=True, minloglevel=2, num_threads=1)
    with pytest.raises(UserError) as info:
        with staged_dir(str(tmp_path / "out")) as work:
            write_hf_tokenizer(SpmModel.parse(model.getvalue(), "tok.model"), work, "tok.model", 128)
    assert str(info.value).startswith("tok.model: tokenizer mismatch: the Hugging Face rebuild")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("change, expect", [
    ({"qk_norm": True}, "model option qk_norm has no equivalent"),
    ({"logit_softcap": 30.0}, "model option logit_softcap has no equivalent"),
    ({"mlp": "relu2"}, "mlp=relu2 is neither Llama-style"),
    ({"norm": "layernorm"}, "norm=layernorm, mlp=swiglu is neither"),
    ({"positions": "learned", "norm": "layernorm", "mlp": "gelu", "n_kv_heads": 1}, "GPT2LMHeadModel has no grouped"),
])
def test_models_hf_cannot_express_are_refused(change, expect):
    cfg = LLMConfig(**{**dict(vocab_size=64, dim=32, n_layers=1, n_heads=2), **change})
    with pytest.raises(UserError, match=expect):
        architecture(cfg, "ck: model_config")


def test_dit_checkpoint_points_to_diffusers(tmp_path, capsys):
    import torch

    from megalm.export.import_hf import write_checkpoint

    write_checkpoint(str(tmp_path / "dit"), {"w": torch.zeros(2)}, {"task": "diffusion", "model_config": {}}, {})
    line = one_error(capsys, ["export", str(tmp_path / "dit"), "--format", "gguf", "--out", str(tmp_path / "out")])
    assert line.endswith("step_00000000: a DiT (diffusion) checkpoint: export it with --format diffusers"), line
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("argv, expect", [
    (["export", "ck", "--format", "hf"], "megalm export: the following arguments are required: --out"),
    (["import-hf", "hf"], "megalm import-hf: the following arguments are required: --out"),
])
def test_usage_errors_are_one_line(capsys, argv, expect):
    assert one_error(capsys, argv) == f"error: {expect} (see {expect.split(':')[0]} --help)"


def test_tokenizer_larger_than_the_vocabulary_is_refused(trained, tmp_path, capsys):
    import hashlib

    from megalm.export.import_hf import write_checkpoint
    from megalm.models.llm import LLM

    cfg = LLMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2)
    blob = open(os.path.join(trained["shards"], "tokenizer.model"), "rb").read()  # 320 pieces
    data = {"tokenizer_path": os.path.join(trained["shards"], "tokenizer.model"),
            "tokenizer_sha256": hashlib.sha256(blob).hexdigest(), "tokenizer_model": blob, "vocab_size": 64,
            "eos_id": 2, "model_config": cfg.to_dict()}
    write_checkpoint(str(tmp_path / "ck"), LLM(cfg).state_dict(), data, {})
    line = one_error(capsys, ["export", str(tmp_path / "ck"), "--format", "hf", "--out", str(tmp_path / "out")])
    assert "tokenizer mismatch: the tokenizer has 320 pieces but the model's vocab_size is 64" in line, line
    assert nothing_written(tmp_path)
