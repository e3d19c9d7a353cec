"""`task: sft` on 2 real gloo ranks, from a pretrained megalm checkpoint (`checkpoint.init_from`):
- full finetuning under ZeRO-3: the loss falls on a small memorisation set; 4 + resume + 4
  steps == 8 straight steps, bit for bit;
- LoRA under ZeRO-3: step 1 equals the base model's loss (B = 0), only adapters change, the
  adapters are also saved alone, resume is exact, and the merged model reproduces the LoRA model;
- the LoRA run exported with --format hf is the merged model in transformers (logits), and its
  tokenizer_config.json carries the run's chat template (apply_chat_template == megalm's rendering);
  the GGUF export holds the merged weights too;
- bad input (another model shape, another tokenizer, LoRA outside sft) is one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megalm.engine import layout
from megalm.engine.layout import resolve
from megalm.models.load import load_model
from megalm.cli import main as cli
from megalm.errors import UserError
from megalm.models.llm import LLM, LLMConfig
from megalm.models.lora import LoraConfig, apply_lora
from megalm.train.config import load_config
from megalm.train.task import build_task
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import run_distributed
from tests.train.sft_jobs import MODEL as MODEL_ARGS, sft_overrides

pytestmark = pytest.mark.timeout(900)


def _prep(tmp, name: str, tokenizer: str) -> str:
    src = tmp / f"{name}.jsonl"
    words = "one two three four five six".split()
    src.write_text("".join(json.dumps({"prompt": f"Count to {n % 6 + 1}, item {n}",
                                       "response": " ".join(words[: n % 6 + 1])}) + "\n" for n in range(16)))
    out = tmp / name
    assert cli(["prep", "--sft", str(src), "--tokenizer", tokenizer, "-o", str(out), "--valid-fraction", "0.2"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    text = make_corpus(str(tmp / "text"))
    sft = _prep(tmp, "sft", text)
    work = tmp / "work"
    work.mkdir()
    result = run_distributed("tests.train.sft_jobs:sft_runs", {"workdir": str(work), "text": text, "sft": sft},
                             nproc=2)[0]
    return {"tmp": tmp, "text": text, "sft": sft, "work": work, **result}


def _exact(r):
    assert r["straight"]["step"] == r["split"]["step"] == 8
    assert r["straight"]["losses"] == r["split"]["losses"]  # exact float equality
    assert r["straight"]["weights_sha256"] == r["split"]["weights_sha256"]


def test_full_finetune_zero3_learns_and_resumes_exactly(job):
    _exact(job["full"])
    losses = job["full"]["straight"]["losses"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_lora_zero3_trains_adapters_only_and_resumes_exactly(job):
    _exact(job["lora"])
    # B = 0: the first step's loss is the base model's, the same as full finetuning's first step
    assert job["lora"]["straight"]["losses"][0] == job["full"]["straight"]["losses"][0]
    losses = job["lora"]["straight"]["losses"]
    assert losses[-1] < losses[0]
    base_reader, base_tag = resolve(os.path.join(job["work"], "runs/base"))
    base_model, _ = load_model(os.path.join(job["work"], "runs/base"))
    base = base_model.state_dict()
    reader, tag = resolve(os.path.join(job["work"], "runs/lora-straight"))
    tag_dir = os.path.join(reader.dir, tag)
    raw = layout.weights(tag_dir, layout.client_state(tag_dir), base_model)  # ZeRO-3 consolidation, LoRA names
    adapters = {k: v for k, v in raw.items() if k.endswith((".lora_A", ".lora_B"))}
    assert len(adapters) == 2 * 5 * 2  # 5 targets x 2 layers
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith(".lora_B"))
    for name, value in raw.items():  # everything else is the base model, bit for bit
        if name not in adapters:
            assert torch.equal(value, base[name.replace(".base.", ".")]), name
    # the adapters alone, inside the published checkpoint (listed in its manifest)
    from safetensors.torch import load_file

    alone = load_file(os.path.join(tag_dir, "adapter.safetensors"))
    assert alone.keys() == adapters.keys() and all(torch.equal(alone[k], adapters[k]) for k in alone)
    listed = {f["path"] for f in json.load(open(os.path.join(tag_dir, "manifest.json")))["files"]}
    assert {"adapter.safetensors", "adapter_config.json"} <= listed
    config = json.load(open(os.path.join(tag_dir, "adapter_config.json")))
    assert config["rank"] == 4 and config["base_model"]["init_from"].endswith("runs/base")
    # `megalm sample`'s loader merges: the same logits as the LoRA model itself
    merged, meta = load_model(tag_dir)
    lora_model = LLM(LLMConfig.from_dict(dict(meta["data"]["model_config"])))
    apply_lora(lora_model, LoraConfig(**meta["data"]["lora"]))
    lora_model.load_state_dict(raw)
    x = torch.randint(0, 300, (2, 24))
    assert torch.allclose(merged(x), lora_model.eval()(x), atol=1e-5)


def _task(job, *extra: str):
    cfg = load_config(None, sft_overrides(job["sft"], "x", 2, os.path.join(job["work"], "runs/base"), list(extra)))
    return build_task(cfg)


def test_init_from_loads_the_base_weights(job):
    model = _task(job).build_model()
    base, _ = load_model(os.path.join(job["work"], "runs/base"))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_init_from_another_model_shape_is_one_line(job):
    with pytest.raises(UserError, match=r"checkpoint\.init_from: .*another model shape \(model\.dim is 32 there, "
                                        r"64 here\)"):
        _task(job, "model.dim=64").build_model()


def test_init_from_another_tokenizer_is_one_line(job):
    other = _prep(job["tmp"], "other-tok", make_corpus(str(job["tmp"] / "text-other"), vocab_size=300))
    cfg = load_config(None, sft_overrides(other, "y", 2, os.path.join(job["work"], "runs/base"), ["model.vocab_size=320"]))
    with pytest.raises(UserError, match=r"checkpoint\.init_from: .* another tokenizer"):
        build_task(cfg).build_model()


def test_lora_outside_sft_and_missing_init_from_are_one_line(job, tmp_path):
    with pytest.raises(UserError, match=r"lora\.rank: LoRA finetunes with task: sft"):
        load_config(None, ["task=lm", "lora.rank=4", f"data.paths=[{job['text']}]", "train.steps=1"])
    for extra, error in (("parallel.pipeline_stages=2", r"lora\.rank: LoRA is not supported with parallel"),
                         ("optimizer.name=muon", r"optimizer\.name: muon is not supported with lora")):
        with pytest.raises(UserError, match=error):
            load_config(None, ["task=sft", "lora.rank=4", "parallel.zero_stage=1", extra,
                               f"data.paths=[{job['sft']}]", "train.steps=1"])
    with pytest.raises(UserError, match=r"no such checkpoint"):
        _task(job, f"checkpoint.init_from={tmp_path / 'nothing'}").build_model()


def test_truncated_examples_are_said_once(tmp_path, capsys):
    text = make_corpus(str(tmp_path / "text"))
    sft = _prep(tmp_path, "sft", text)
    cfg = load_config(None, ["task=sft", f"data.paths=[{sft}]", "data.seq_len=12", "train.steps=1",
                             "batch.micro_batch=2", "batch.global_batch=2", *MODEL_ARGS])
    capsys.readouterr()
    loader = build_task(cfg).build_loader("train", 0, 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "examples are longer than data.seq_len=12; they keep their first 13" in err[0]
    assert next(iter(loader))[0]["input_ids"].shape == (2, 12)


def test_sample_chat_renders_the_runs_template(job, capsys):
    import sentencepiece as spm

    from data_prep.chat import ChatTemplate

    run = os.path.join(job["work"], "runs/lora-straight")
    capsys.readouterr()
    assert cli(["sample", run, "--chat", "--prompt", "Count to 3", "--temperature", "0",
                "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.strip()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(job["text"], "tokenizer.model"))
    assert out.startswith(sp.decode(sp.encode(ChatTemplate().prompt([("user", "Count to 3")]))))
    assert cli(["sample", os.path.join(job["work"], "runs/base"), "--chat", "--prompt", "x"]) == 2
    assert "not an SFT checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_export(job):
    """The LoRA (ZeRO-3) run exported with --format hf: adapters merged, chat template written."""
    out = str(job["tmp"] / "lora-hf")
    assert cli(["export", os.path.join(job["work"], "runs/lora-straight"), "--format", "hf", "--dtype", "fp32",
                "--out", out]) == 0
    return out


def test_lora_export_is_the_merged_model_in_transformers(job, lora_export):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    merged, meta = load_model(os.path.join(job["work"], "runs/lora-straight"))
    base, _ = load_model(os.path.join(job["work"], "runs/base"))
    hf = AutoModelForCausalLM.from_pretrained(lora_export, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        got = hf(x).logits
        assert (got - merged(x)).abs().max().item() <= 1e-4
        assert (got - base(x)).abs().max().item() > 1e-3  # the trained adapters are in the weights
    names = set()
    for file in os.listdir(lora_export):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(lora_export, file), "pt") as f:
                names |= set(f.keys())
    assert not any("lora" in n or ".base." in n for n in names), sorted(names)[:5]
    # the progress bar's total counts what the merged stream yields, not the adapters it folds away
    from megalm.export.hf import model_items
    from megalm.export.source import CheckpointTensors
    from megalm.models.lora import is_adapter

    src = CheckpointTensors(os.path.join(job["work"], "runs/lora-straight"))
    assert src.numel(skip=is_adapter) == sum(t.numel() for _, t in model_items(src)) < src.numel()


def test_lora_export_carries_the_chat_template(job, lora_export):
    from transformers import AutoTokenizer

    from data_prep.chat import ChatTemplate

    tok = AutoTokenizer.from_pretrained(lora_export)
    _, meta = load_model(os.path.join(job["work"], "runs/lora-straight"))
    template = ChatTemplate(**meta["data"]["chat_template"])
    turns = [("user", "Count to 3"), ("assistant", "one two three")]
    messages = [{"role": r, "content": c} for r, c in turns]
    assert tok.apply_chat_template(messages, tokenize=False) == template.render(turns, tok.eos_token)
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == \
        template.prompt(turns[:1])
    # the rendered chat tokenizes to the ids the SFT data was prepared with
    from data_prep.chat import encode_example
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(job["text"], "tokenizer.model"))
    ids, _ = encode_example(sp, template, turns, sp.eos_id())
    assert tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"] == ids


def test_lora_gguf_export_holds_the_merged_weights(job, tmp_path):
    import numpy as np
    from gguf import GGUFReader

    run = os.path.join(job["work"], "runs/lora-straight")
    assert cli(["export", run, "--format", "gguf", "--dtype", "fp32", "--out", str(tmp_path / "gguf")]) == 0
    got = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    merged = load_model(run)[0].state_dict()
    base = load_model(os.path.join(job["work"], "runs/base"))[0].state_dict()
    for i in range(2):  # LoRA targets wq, wv, w1, w2, w3; v, gate and down are stored unpermuted
        for gg, mg in (("attn_v", "attention.wv"), ("ffn_gate", "feed_forward.w1"), ("ffn_down", "feed_forward.w2")):
            want = merged[f"layers.{i}.{mg}.weight"]
            assert np.array_equal(got[f"blk.{i}.{gg}.weight"], want.numpy()), gg
            assert not torch.equal(want, base[f"layers.{i}.{mg}.weight"]), gg
