"""megalm plan: exact parameter counts, DeepSpeed's real partition sizes on 2 CPU ranks (ZeRO 0-3,
tensor and sequence parallelism) within 10 % of the model, fitting/not fitting and the fastest
layout for known cases, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megalm.models.config import LLMConfig
from megalm.models.llm import LLM
from megalm.models.presets import load_preset, preset_names
from megalm.plan import GIB, GPUS, fastest, flops_per_token, load, param_count, params_per_gpu, plan, state_bytes
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env, run_distributed


@pytest.mark.parametrize("name", preset_names())
def test_param_count_and_flops_match_the_model(name):
    cfg = load_preset(name)
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = LLM(cfg)
    assert param_count(cfg) == model.num_params()
    assert flops_per_token(cfg, 128) == model.flops_per_token(128)


# (dtype, ZeRO stage, tensor parallel, sequence parallel)
CASES = [["fp32", 0, 1, 1], ["fp32", 1, 1, 1], ["fp32", 2, 1, 1], ["fp32", 3, 1, 1], ["bf16", 0, 1, 1],
         ["bf16", 1, 1, 1], ["bf16", 2, 1, 1], ["bf16", 3, 1, 1], ["bf16", 1, 2, 1], ["bf16", 3, 2, 1],
         ["fp32", 2, 2, 1], ["bf16", 1, 1, 2], ["fp32", 2, 1, 2]]


def test_state_model_matches_deepspeed_partitions_on_two_ranks(tmp_path):
    """What the plan says a GPU holds (from the model's shapes alone: the TP split included)
    against what DeepSpeed allocated on each rank."""
    shards = make_corpus(str(tmp_path / "shards"))
    ranks = run_distributed("tests.plan.jobs:measure", {"workdir": str(tmp_path), "shards": shards, "cases": CASES})
    for case in ranks[0]:
        for rank in ranks:
            real = rank[case]
            m = LLMConfig.from_dict(real["model"])
            tp, sp = real["tp"], real["sp"]
            assert real["n_params"] == pytest.approx(params_per_gpu(m, tp), rel=0.01), (case, real)
            # ZeRO partitions over the data-parallel ranks (with SP: data × sequence ranks).
            zero_group = 2 // (tp * sp) * sp
            params, _, optim = state_bytes(params_per_gpu(m, tp), real["dtype"], real["zero"], dp=zero_group)
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


def _best(preset, gpus, seq, *overrides):
    batch = max(1, 8 * 2**20 // seq)  # 8M tokens per step
    return fastest(_rows(preset, gpus, f"data.seq_len={seq}", f"batch.global_batch={batch}", *overrides))


def test_fastest_layouts_for_llama3():
    """8M-token steps on H100s: the planner's picks follow the trade-offs it models."""
    # 8B at 8k: plain ZeRO-1 data parallelism fits; nothing model-parallel is faster.
    for gpus in (64, 256, 1024):
        best = _best("llama3-8b", gpus, 8192)
        assert (best.zero, best.tp, best.sp, best.pipeline) == (1, 1, 1, 1), best
    # 8B at 128k: 128k tokens of activations per GPU do not fit; Ulysses splits the sequence.
    best = _best("llama3-8b", 512, 131072)
    assert best.sp == 8 and best.fits_ckpt, best
    rows = _rows("llama3-8b", 512, "data.seq_len=131072", "batch.global_batch=64")
    tpsp = next(r for r in rows if (r.tp, r.sp, r.zero) == (2, 4, 1))  # both at once, inside a node
    sp8 = next(r for r in rows if (r.tp, r.sp, r.zero) == (1, 8, 1))
    assert tpsp.params_gib < 0.6 * sp8.params_gib and tpsp.act_ckpt_gib < 2 * sp8.act_ckpt_gib  # embeddings stay whole
    # 70B at 8k on 256-1024 GPUs: tensor parallelism inside the node (ZeRO-3 alone would gather
    # 141 GB of weights every micro batch over the network).
    for gpus in (256, 512, 1024):
        best = _best("llama3-70b", gpus, 8192)
        assert best.tp == 8, best
    zero3 = next(r for r in _rows("llama3-70b", 512, "batch.global_batch=1024") if r.zero == 3 and r.tp == 1 and
                 r.pipeline == 1)
    assert zero3.step_s > _best("llama3-70b", 512, 8192).step_s
    # 70B at 128k: only ZeRO-3 with sequence parallelism fits (weights partitioned over every
    # rank, 128k positions split over the node), from 64 GPUs on.
    for gpus in (64, 512):
        best = _best("llama3-70b", gpus, 131072)
        assert best.zero == 3 and best.sp >= 4 and best.tp == 1, best
    assert not any(r.fits_ckpt for r in _rows("llama3-70b", 64, "data.seq_len=131072", "batch.global_batch=64")
                   if r.sp == 1)


MODEL_PARALLEL_EXAMPLES = ["llama3-70b-8k", "llama3-70b-32k", "llama3-70b-128k", "llama3-8b-128k"]


@pytest.mark.parametrize("name", MODEL_PARALLEL_EXAMPLES)
def test_shipped_large_model_configs_use_the_fastest_layout_and_submit_for_512_gpus(name, tmp_path):
    """Each example's parallel settings are what the planner picks for 512 H100s, and `megalm
    submit --dry-run` accepts it for 64 nodes × 8 GPUs."""
    config = str(REPO / "configs" / f"{name}.yaml")
    cfg = load(config, [])
    best = fastest(plan(cfg, 512, GPUS["h100"], 0.4)[1])
    p = cfg.parallel
    assert (best.zero, best.pipeline, best.tp, best.sp, not best.fits) == (
        p.zero_stage, p.pipeline_stages, p.tensor_parallel, p.sequence_parallel, p.activation_checkpointing)
    r = subprocess.run([sys.executable, "-m", "megalm.cli", "submit", config, "--nodes", "64", "--gpus-per-node", "8",
                        "--time", "2-00:00:00", "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                       env=cpu_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=64" in r.stdout and f"/{name}.yaml --resume auto" in r.stdout
    assert "#SBATCH --ntasks-per-node=8" in r.stdout


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "megalm.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, env=cpu_env(), timeout=120)


def test_cli_table_and_errors():
    ok = _plan("llama3-8b", "data.seq_len=8192", "batch.micro_batch=1", "batch.global_batch=512", "--gpus", "64")
    assert ok.returncode == 0, ok.stderr
    assert "8.03B parameters" in ok.stdout and "max mb+ckpt" in ok.stdout and "comm GiB" in ok.stdout
    assert ok.stdout.strip().splitlines()[-1].startswith("fastest that fits: parallel.zero_stage=")
    too_big = _plan("llama3-70b", "data.seq_len=8192", "batch.micro_batch=1", "--gpus", "8")
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: llama3-70b: does not fit on 8 × H100")
    assert too_big.stderr.count("\n") == 1 and "optimizer" in too_big.stderr
    for args, message in [(["tiny", "--gpus", "8", "--gpu", "v99"], "--gpu: unknown GPU 'v99'"),
                          (["tiny", "--gpus", "0"], "--gpus: expected >= 1"),
                          (["nope.yaml", "--gpus", "8"], "nope.yaml: no such config file or model preset"),
                          (["tiny", "batch.micro_batch=0", "--gpus", "8"], "batch.micro_batch")]:
        bad = _plan(*args)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
