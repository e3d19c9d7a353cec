"""Config loading: typed sections, dotted overrides, one-line errors naming the key, DeepSpeed config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megalm.engine.config import to_deepspeed_config
from megalm.errors import UserError
from megalm.train.config import load_config
from megalm.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[2]
BASE = ["data.paths=[d]", "train.steps=10"]


def cfg_of(*overrides: str, world_size: int | None = None):
    return load_config(None, [*BASE, *overrides], world_size=world_size)


def error_of(*overrides: str, world_size: int | None = None) -> str:
    with pytest.raises(UserError) as exc:
        cfg_of(*overrides, world_size=world_size)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nmodel: tiny\ndata: {paths: [a, b], weights: [1, 3], seq_len: 64}\n"
                    "optimizer: {lr: 1e-3}\ntrain: {steps: 5}\n")
    cfg = load_config(str(path), ["model.n_layers=2", "batch.micro_batch=2", "optimizer.betas=[0.9,0.99]"])
    assert cfg.model == {"preset": "tiny", "n_layers": 2}
    assert cfg.data.paths == ["a", "b"] and cfg.data.weights == [1.0, 3.0]
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.batch.micro_batch == 2 and cfg.source == "run.yaml"


@pytest.mark.parametrize("overrides, key", [
    (["batch.micro_batch=0"], "batch.micro_batch"),
    (["optimizer.schedule=step"], "optimizer.schedule"),
    (["optimizer.lrr=1"], "optimizer.lrr: unknown key"),
    (["bogus=1"], "bogus: unknown key"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["precision.dtype=fp8"], "precision.dtype"),
    (["train.tokens=100"], "train.steps"),
    (["batch.micro_batch=x"], "batch.micro_batch: expected an integer"),
    (["data.weights=[1,2]"], "data.weights"),
    (["optimizer.min_lr=1"], "optimizer.min_lr"),
    (["bad_steps.spike_factor=0.5"], "bad_steps.spike_factor"),
    (["parallel.offload_optimizer=true", "parallel.zero_stage=0"], "parallel.offload_optimizer"),
])
def test_bad_values_name_the_key(overrides, key):
    assert key in error_of(*overrides)


def test_batch_must_divide_over_ranks():
    msg = error_of("batch.micro_batch=4", "batch.global_batch=12", world_size=2)
    assert msg == ("config: batch.global_batch: must be a multiple of micro_batch × data-parallel size "
                   "(4 × 2), got 12")
    assert cfg_of("batch.micro_batch=2", "batch.global_batch=8", world_size=2).grad_accum(2) == 2


def test_zero2_with_pipeline_is_rejected():
    msg = error_of("parallel.zero_stage=2", "parallel.pipeline_stages=2")
    assert msg.startswith("config: parallel.zero_stage: ZeRO-2 cannot be combined with pipeline")
    assert "pipeline" in error_of("parallel.pipeline_stages=2", world_size=3)


@pytest.mark.parametrize("overrides, world, expected", [
    (["parallel.sequence_parallel=2", "parallel.pipeline_stages=2"], None,
     "config: parallel.sequence_parallel: sequence parallelism (2) cannot be combined with pipeline_stages=2 "
     "(DeepSpeed's pipeline engine takes no sequence-parallel groups); use one of them"),
    (["parallel.sequence_parallel=2", "parallel.tensor_parallel=2", "parallel.zero_stage=3"], None,
     "config: parallel.zero_stage: ZeRO-3 cannot be combined with tensor_parallel=2 and sequence_parallel=2 "
     "together; use zero_stage 1 or 2"),
    (["parallel.sequence_parallel=0"], None, "config: parallel.sequence_parallel: expected a positive number, got 0"),
    (["parallel.sequence_parallel=3", "data.seq_len=64"], None,
     "config: data.seq_len: 64 positions do not split evenly over parallel.sequence_parallel=3"),
    (["parallel.sequence_parallel=2", "task=diffusion"], None,
     "config: parallel.sequence_parallel: task diffusion does not run sequence-parallel; expected 1, got 2"),
    (["parallel.sequence_parallel=2", "optimizer.name=muon", "optimizer.grad_clip=0"], None,
     "config: optimizer.name: muon is not supported with parallel.sequence_parallel > 1 yet; use adamw"),
    (["parallel.sequence_parallel=4"], 6,
     "config: parallel.sequence_parallel: world size 6 is not a multiple of pipeline_stages × sequence_parallel "
     "× tensor_parallel (1 × 4 × 1)"),
    (["parallel.tensor_parallel=4"], 6,
     "config: parallel.tensor_parallel: world size 6 is not a multiple of pipeline_stages × sequence_parallel "
     "× tensor_parallel (1 × 1 × 4)"),
    (["parallel.tensor_parallel=2", "parallel.pipeline_stages=2"], None,
     "config: parallel.tensor_parallel: tensor_parallel=2 cannot be combined with pipeline_stages=2 (DeepSpeed's "
     "pipeline engine builds its own model-parallel grid); use one of them"),
    (["parallel.tensor_parallel=2", "task=diffusion"], None,
     "config: parallel.tensor_parallel: task diffusion does not run tensor-parallel; expected 1, got 2"),
    (["parallel.tensor_parallel=2", "optimizer.name=muon", "optimizer.grad_clip=0"], None,
     "config: optimizer.name: muon is not supported with parallel.tensor_parallel > 1 yet; use adamw"),
    (["parallel.tensor_parallel=2", "task=sft", "lora.rank=4"], None,
     "config: lora.rank: LoRA is not supported with parallel.tensor_parallel > 1 yet"),
    (["deepspeed={tensor_parallel: {autotp_size: 2}}"], 2,
     "config: deepspeed.tensor_parallel: megalm sets this itself (from parallel.tensor_parallel); set "
     "parallel.tensor_parallel instead"),
    (["deepspeed={sequence_parallel_size: 2}"], 2,
     "config: deepspeed.sequence_parallel_size: megalm sets this itself (from parallel.sequence_parallel); set "
     "parallel.sequence_parallel instead"),
])
def test_impossible_model_parallel_layouts_are_refused(overrides, world, expected):
    assert error_of(*overrides, world_size=world) == expected


def test_tensor_and_sequence_parallel_compose():
    cfg = cfg_of("parallel.sequence_parallel=2", "parallel.tensor_parallel=2", "batch.micro_batch=2",
                 "batch.global_batch=8", world_size=8)
    assert cfg.dp_size(8) == 2 and cfg.grad_accum(8) == 2


@pytest.mark.parametrize("key", ["sequence_parallel", "tensor_parallel"])
def test_model_parallel_ranks_share_the_data_parallel_batch(key):
    cfg = cfg_of(f"parallel.{key}=2", "batch.micro_batch=2", "batch.global_batch=8", world_size=4)
    assert cfg.dp_size(4) == 2 and cfg.grad_accum(4) == 2
    assert to_deepspeed_config(cfg, 4)["gradient_accumulation_steps"] == 2
    assert cfg.megalm_grad_norm() is (key == "sequence_parallel")  # TP: DeepSpeed's norm knows the slices


def test_raw_deepspeed_overrides_never_replace_what_megalm_sets():
    msg = error_of("deepspeed={train_batch_size: 64}", world_size=1)
    assert "deepspeed.train_batch_size" in msg and "set batch.global_batch instead" in msg
    assert "set parallel.zero_stage instead" in error_of("deepspeed={zero_optimization: {stage: 3}}", world_size=1)
    assert "deepspeed.bf16.enabled" in error_of("deepspeed={bf16: {enabled: false}}", world_size=1)
    assert "deepspeed.steps_per_print" in error_of("deepspeed={steps_per_print: 1}", world_size=1)
    # New keys, also inside sections megalm writes, are merged.
    ds = to_deepspeed_config(cfg_of("deepspeed={zero_optimization: {reduce_bucket_size: 7}, flops_profiler: {}}"), 1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 7 and ds["flops_profiler"] == {}


def test_deepspeed_config_is_generated():
    cfg = cfg_of("batch.micro_batch=2", "batch.global_batch=16", "parallel.zero_stage=3",
                 "parallel.offload_optimizer=true", "precision.dtype=fp16", "optimizer.grad_clip=0.5",
                 "deepspeed={zero_optimization: {reduce_bucket_size: 1000}}", world_size=2)
    ds = to_deepspeed_config(cfg, 2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 1000}
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0.0 and "bf16" not in ds
    assert ds["zero_force_ds_cpu_optimizer"] is False  # offload runs our FusedAdamW on the CPU
    assert "zero_force_ds_cpu_optimizer" not in to_deepspeed_config(cfg_of(world_size=1), 1)


def test_zero0_adamw_is_stepped_by_megalm():
    """ZeRO-0 + AdamW: DeepSpeed only all-reduces (bf16 gradients in bf16, as its bf16 mode would);
    megalm's AdamW keeps the masters and megalm clips, so DeepSpeed's wrapper and clip are off."""
    ds = to_deepspeed_config(cfg_of("parallel.zero_stage=0", "optimizer.grad_clip=0.5", world_size=1), 1)
    assert "bf16" not in ds and ds["communication_data_type"] == "bf16" and ds["gradient_clipping"] == 0.0
    fp32 = to_deepspeed_config(cfg_of("parallel.zero_stage=0", "precision.dtype=fp32", world_size=1), 1)
    assert "communication_data_type" not in fp32 and fp32["gradient_clipping"] == 0.0
    # Elsewhere DeepSpeed keeps its own: pipelines, Muon, fp16 (loss scaling), ZeRO >= 1.
    for over in (["parallel.pipeline_stages=2"], ["optimizer.name=muon"], ["precision.dtype=fp16"],
                 ["parallel.zero_stage=1"]):
        cfg = cfg_of(*(["parallel.zero_stage=0"] if "parallel.zero_stage=1" not in over else []), *over,
                     world_size=2)
        assert not cfg.megalm_zero0(), over
        ds = to_deepspeed_config(cfg, 2)
        assert ds["gradient_clipping"] == cfg.optimizer.grad_clip and "communication_data_type" not in ds, over
    assert "precision.dtype" in error_of("parallel.zero_stage=0", "deepspeed={communication_data_type: fp32}",
                                         world_size=1)


def test_zero0_checkpoints_megalm_cannot_step_are_refused_in_one_line():
    from megalm.train.build import ZERO0_OPTIMIZER, check_zero0_optimizer

    bf16, fp32 = (cfg_of("parallel.zero_stage=0", f"precision.dtype={d}", world_size=1) for d in ("bf16", "fp32"))
    old = {"config": bf16.to_dict(), "megalm_version": "0.9"}  # saved before megalm stepped ZeRO-0 itself
    wrapper = (r"^parallel.zero_stage: this ZeRO-0 bf16 checkpoint holds DeepSpeed's bf16 optimizer wrapper state "
               r"\(saved by megalm 0.9\).*checkpoint.init_from=")
    for cfg in (bf16, fp32):  # resumed in bf16 or in fp32: the wrapper's state is not megalm's
        with pytest.raises(UserError, match=wrapper):
            check_zero0_optimizer(cfg, old)
    ours = {**old, ZERO0_OPTIMIZER: "megalm"}
    check_zero0_optimizer(bf16, ours)
    check_zero0_optimizer(fp32, {"config": fp32.to_dict()})  # fp32 state never had a wrapper
    # Another precision: bf16 state carries fp32 masters, fp32 state none.
    with pytest.raises(UserError, match=r"^precision.dtype: this ZeRO-0 checkpoint was trained in bf16, .* "
                                        r"resume with precision.dtype=bf16"):
        check_zero0_optimizer(fp32, ours)
    with pytest.raises(UserError, match=r"^precision.dtype: .* trained in fp32, .* to bf16"):
        check_zero0_optimizer(bf16, {"config": fp32.to_dict(), ZERO0_OPTIMIZER: "megalm"})


def test_raw_deepspeed_precision_sections_are_refused():
    # ZeRO-0 bf16 writes no `bf16` section (megalm keeps the masters); a raw one would wrap megalm's AdamW.
    for over in (["parallel.zero_stage=0"], ["precision.dtype=fp32"]):
        for raw in ("bf16: {enabled: true}", "fp16: {enabled: true}", "torch_autocast: {enabled: true}"):
            msg = error_of(*over, f"deepspeed={{{raw}}}", world_size=1)
            assert f"deepspeed.{raw.split(':')[0]}" in msg and "set precision.dtype instead" in msg, (over, raw)


def test_tokens_budget_sets_steps():
    cfg = load_config(None, ["data.paths=[d]", "train.tokens=1000", "data.seq_len=10", "batch.global_batch=8"])
    assert cfg.total_steps() == 13  # ceil(1000 / 80)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules(schedule):
    cfg = cfg_of(f"optimizer.schedule={schedule}", "optimizer.lr=1.0", "optimizer.min_lr=0.1",
                 "optimizer.warmup_steps=10", "optimizer.decay_fraction=0.5")
    o = cfg.optimizer
    lrs = [lr_at(s, 110, o) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "constant":
        assert lrs[-1] == 1.0
        return
    assert lrs[-1] == pytest.approx(0.1, abs=0.02)  # ends at min_lr
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    if schedule == "wsd":
        assert lrs[50] == 1.0 and lrs[60] < 1.0  # stable until the last half, then decays
    if schedule == "cosine":
        assert lrs[60] == pytest.approx(0.55, abs=0.01)  # half-way: mean of lr and min_lr


def test_cli_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {paths: [x]}\ntrain: {steps: 4}\nparallel: {zero_stage: 3, pipeline_stages: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "train", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: bad.yaml: parallel.zero_stage: ZeRO-3 cannot be combined with pipeline parallelism "
        "(pipeline_stages=2); DeepSpeed allows ZeRO 0 or 1 with pipelines"]
    path.write_text("data: {paths: [x]\n")
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "train", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: bad.yaml:2: invalid YAML")


@pytest.mark.parametrize("name, world", [("demo", 2), ("gpt2-124m", 8), ("sft-tiny", 2)])
def test_shipped_configs_load(name, world):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), world_size=world)
    ds = to_deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == cfg.batch.global_batch
    if name == "demo":
        assert cfg.parallel.zero_stage == 2 and cfg.grad_accum(2) == 2


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=.nan", "optimizer.lr"), ("optimizer.lr=nan", "optimizer.lr"), ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.min_lr=.nan", "optimizer.min_lr"), ("optimizer.grad_clip=.inf", "optimizer.grad_clip"),
    ("optimizer.weight_decay=-.inf", "optimizer.weight_decay"), ("optimizer.eps=.nan", "optimizer.eps"),
    ("bad_steps.spike_factor=.nan", "bad_steps.spike_factor"), ("train.steps=.inf", "train.steps"),
    ("train.tokens=.nan", "train.tokens"), ("precision.loss_scale=.inf", "precision.loss_scale"),
    ("optimizer.betas=[0.9,.nan]", "optimizer.betas[1]"),
])
def test_non_finite_numbers_rejected_with_their_key(override, key):
    assert f": {key}: expected" in error_of(override)


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=0", "optimizer.lr"), ("optimizer.lr=-1e-3", "optimizer.lr"),
    ("optimizer.min_lr=1", "optimizer.min_lr"), ("optimizer.grad_clip=-1", "optimizer.grad_clip"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"), ("optimizer.eps=0", "optimizer.eps"),
    ("precision.loss_scale=-1", "precision.loss_scale"), ("precision.initial_scale_power=-1", "precision.initial_scale_power"),
    ("precision.initial_scale_power=64", "precision.initial_scale_power"),
])
def test_out_of_range_numbers_name_their_key(override, key):
    assert f": {key}: expected" in error_of(override)


def test_fp16_rejected_on_cpu_accelerator():
    cfg = cfg_of("precision.dtype=fp16")
    cfg.validate_accelerator("cuda")  # fine on a GPU
    with pytest.raises(UserError, match=r"config: precision\.dtype: fp16 needs a GPU") as exc:
        cfg.validate_accelerator("cpu")
    assert "\n" not in str(exc.value)
    cfg_of("precision.dtype=bf16").validate_accelerator("cpu")


def test_data_verify_option():
    assert cfg_of().data.verify is False and cfg_of("data.verify=true").data.verify is True
    assert "data.verify: expected true or false" in error_of("data.verify=3")


def test_shipped_example_by_name_and_unknown_name_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout: found as package data, not ./configs
    assert load_config("demo", ["data.paths=[d]"]).name == "demo"
    assert load_config("diffusion-digits", ["data.paths=[d]"]).task == "diffusion"
    with pytest.raises(UserError, match=r"^nope: cannot read config .*shipped examples: demo, diffusion-digits, "
                                        r"gpt2-124m, llama3-1b, llama3-70b-128k, llama3-70b-32k, llama3-70b-8k, llama3-8b-128k, "
                                        r"recipe-gpt2-124m, "
                                        r"recipe-tiny, sft-tiny$"):
        load_config("nope")
