"""megalm plan: exact parameter counts, DeepSpeed's real partition sizes on 2 CPU ranks within
10 % of the model, fitting/not fitting for known cases, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megalm.models.llm import LLM
from megalm.models.presets import load_preset, preset_names
from megalm.plan import GIB, GPUS, flops_per_token, load, param_count, plan, state_bytes
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env, run_distributed


@pytest.mark.parametrize("name", preset_names())
def test_param_count_and_flops_match_the_model(name):
    cfg = load_preset(name)
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = LLM(cfg)
    assert param_count(cfg) == model.num_params()
    assert flops_per_token(cfg, 128) == model.flops_per_token(128)


CASES = [["fp32", 0], ["fp32", 1], ["fp32", 2], ["fp32", 3], ["bf16", 0], ["bf16", 1], ["bf16", 2], ["bf16", 3]]


def test_state_model_matches_deepspeed_partitions_on_two_ranks(tmp_path):
    shards = make_corpus(str(tmp_path / "shards"))
    ranks = run_distributed("tests.plan.jobs:measure", {"workdir": str(tmp_path), "shards": shards, "cases": CASES})
    for case in ranks[0]:
        for rank in ranks:
            real = rank[case]
            params, _, optim = state_bytes(real["n_params"], real["dtype"], real["zero"], dp=2)
            assert real["params"] == pytest.approx(params, rel=0.10), (case, real, params)
            assert real["optim"] == pytest.approx(optim, rel=0.10), (case, real, optim)
            # A healthy first step is applied; DeepSpeed's ZeRO-0 fp16/bf16 wrapper stepping the
            # optimizer while it is built is not a (skipped) training step.
            assert real["skipped"] == 0, (case, real)


def _rows(preset, gpus, *overrides):
    cfg = load(preset, ["data.seq_len=8192", "batch.micro_batch=1", "batch.global_batch=1024", *overrides])
    return plan(cfg, gpus, GPUS["h100"], 0.4)[1]


def test_known_fits():
    # Llama-3 70B needs ~16 bytes per parameter of state: not on one 8-GPU node, fine on 64 GPUs.
    assert not any(r.fits_ckpt for r in _rows("llama3-70b", 8))
    z3 = next(r for r in _rows("llama3-70b", 64) if r.zero == 3 and r.pipeline == 1)
    assert z3.fits_ckpt and not z3.fits  # 8k tokens of activations need checkpointing at ZeRO-3 alone
    assert z3.params_gib == pytest.approx(70.55e9 * 2 / 64 / GIB, rel=0.01)
    assert z3.optim_gib == pytest.approx(70.55e9 * 12 / 64 / GIB, rel=0.01)
    # GPT-2 124M fits everywhere; its largest micro batch grows with checkpointing.
    rows = _rows("gpt2-124m", 8, "data.seq_len=1024")
    assert all(r.fits for r in rows) and all(r.max_micro_ckpt > r.max_micro > 1 for r in rows)
    # More GPUs, same global batch: faster steps (1024 GPUs listed too).
    assert _rows("llama3-8b", 1024)[0].step_s < _rows("llama3-8b", 8)[0].step_s


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "megalm.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, env=cpu_env(), timeout=120)


def test_cli_table_and_errors():
    ok = _plan("llama3-8b", "data.seq_len=8192", "batch.micro_batch=1", "batch.global_batch=512", "--gpus", "64")
    assert ok.returncode == 0, ok.stderr
    assert "8.03B parameters" in ok.stdout and "max mb+ckpt" in ok.stdout
    too_big = _plan("llama3-70b", "data.seq_len=8192", "batch.micro_batch=1", "--gpus", "8")
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: llama3-70b: does not fit on 8 × H100")
    assert too_big.stderr.count("\n") == 1 and "optimizer" in too_big.stderr
    for args, message in [(["tiny", "--gpus", "8", "--gpu", "v99"], "--gpu: unknown GPU 'v99'"),
                          (["tiny", "--gpus", "0"], "--gpus: expected >= 1"),
                          (["nope.yaml", "--gpus", "8"], "nope.yaml: no such config file or model preset"),
                          (["tiny", "batch.micro_batch=0", "--gpus", "8"], "batch.micro_batch")]:
        bad = _plan(*args)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
