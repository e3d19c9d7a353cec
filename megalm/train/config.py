"""Training config: YAML -> typed dataclasses, validated before any process group or model exists.

The DeepSpeed config is generated from this (`megalm.engine.config`), so a setting is written once.
Errors are one `UserError` line naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megalm import CONFIGS_DIR
from megalm.checkpoint.config import CheckpointConfig
from megalm.data.sources import DataConfig
from megalm.diffusion.config import DiffusionSection
from megalm.errors import UserError
from megalm.models.lora import LoraConfig
from megalm.engine.config import to_deepspeed_config

SCHEDULES = ("cosine", "linear", "wsd", "constant")
MAX_SCALE_POWER = 32  # fp16 dynamic loss scale starts at most at 2**32
DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "muon")
# Every task, by its `task:` value: the one table (megalm.train.task.build_task builds from it).
# Named, not imported: a run imports only its own task's module (diffusion's pulls in image code).
TASKS = {"lm": "megalm.train.task:LMTask", "sft": "megalm.train.sft:SFTTask",
         "diffusion": "megalm.train.diffusion:DiffusionTask"}


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # adamw: every parameter. muon: Muon (orthogonalised momentum) for the 2-D matrices inside the
    # transformer blocks, AdamW (the settings above) for embeddings, head, norms and biases.
    name: str = "adamw"
    muon_lr: float = 0.02  # peak LR of the Muon half; the schedule scales it like `lr`
    muon_momentum: float = 0.95


@dataclass
class BatchSection:
    micro_batch: int = 4  # sequences per rank per forward
    global_batch: int = 32  # sequences per optimizer step, all ranks


@dataclass
class ParallelSection:
    zero_stage: int = 1
    pipeline_stages: int = 1
    activation_checkpointing: bool = False  # recompute every block in backward (done by the model)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU


@dataclass
class PrecisionSection:
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    loss_scale: float = 0.0  # fp16 only; 0 = dynamic loss scaling
    initial_scale_power: int = 16  # fp16 dynamic scaling starts at 2**this (0..MAX_SCALE_POWER)


@dataclass
class LoggingSection:
    interval: int = 10
    tensorboard_dir: str = ""  # default: runs/<name>/tb
    peak_flops: float = 0.0  # per device; 0 = from the GPU model and dtype (train/peak_flops.py); no MFU on CPU
    progress: bool = True  # tqdm bar on rank 0 (plain lines otherwise)


@dataclass
class EvalSection:
    interval: int = 0  # 0 disables periodic eval (still runs at the end when batches > 0)
    batches: int = 8


@dataclass
class TrainSection:
    steps: int = 0  # optimizer steps; or set tokens
    tokens: int = 0
    seed: int = 1234  # model initialisation (the data order has its own data.seed)


@dataclass
class BadStepsSection:
    spike_factor: float = 0.0  # step is bad when loss > k x running mean; 0 = only NaN/inf
    window: int = 20  # steps in the running mean
    max_consecutive: int = 5  # this many bad steps in a row -> roll back and skip the data


@dataclass
class DebugSection:
    # Test hooks that act on the data/loss, never inside the model.
    nan_at_data_steps: list[int] = field(default_factory=list)  # 1-based global batch number
    trace_batches: str = ""  # dir: each rank appends (step, sample fingerprints) JSON lines
    max_steps_this_run: int = 0  # stop (after checkpointing) once this many steps ran in this process
    # Before step N each rank writes runs/<name>/waiting-stepN.rank<r> and blocks until it has
    # received `wait_for_signals` signals: tests signal a run at an exact step without sleeping.
    wait_at_step: int = 0
    wait_for_signals: int = 1


@dataclass
class TrainConfig:
    name: str = "run"
    # lm: next-token pretraining; sft: finetuning on `megalm prep --sft` shards (loss on responses
    # only, optional `lora`); diffusion: DiT on image shards (section `diffusion`)
    task: str = "lm"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    batch: BatchSection = field(default_factory=BatchSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)
    bad_steps: BadStepsSection = field(default_factory=BadStepsSection)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last
    debug: DebugSection = field(default_factory=DebugSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)  # used by task: diffusion
    lora: LoraConfig = field(default_factory=LoraConfig)  # task sft: rank > 0 trains adapters only
    source: str = "config"  # file name used in error messages (not a YAML key)

    # ---- derived -------------------------------------------------------------------------
    def dp_size(self, world_size: int) -> int:
        return world_size // self.parallel.pipeline_stages

    def grad_accum(self, world_size: int) -> int:
        return self.batch.global_batch // (self.batch.micro_batch * self.dp_size(world_size))

    def megalm_grad_norm(self) -> bool:
        """Whether megalm, not DeepSpeed, takes the global gradient norm and checks it for inf/NaN:
        ZeRO-1/2/3 with AdamW in bf16/fp32, no pipeline, no offload. DeepSpeed there runs a norm
        (ZeRO-1/2 in bf16 also an overflow check: ~10 kernels) and a host read per parameter;
        megalm takes one multi-tensor norm over the reduced partition gradients, folded into the
        step's one reduction, and DeepSpeed clips with it."""
        p = self.parallel
        return (p.zero_stage in (1, 2, 3) and p.pipeline_stages == 1 and not p.offload_optimizer
                and self.optimizer.name == "adamw" and self.precision.dtype in ("bf16", "fp32"))

    def total_steps(self) -> int:
        if self.train.steps:
            return self.train.steps
        per_step = self.batch.global_batch * self.data.seq_len
        return -(-self.train.tokens // per_step)

    def run_dir(self) -> Path:
        return Path("runs") / self.name

    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(self.run_dir() / "checkpoints")

    def tensorboard_dir(self) -> str:
        return self.logging.tensorboard_dir or str(self.run_dir() / "tb")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    # ---- validation ----------------------------------------------------------------------
    def _err(self, key: str, what: str) -> UserError:
        return UserError(f"{self.source}: {key}: {what}")

    def validate(self, world_size: int | None = None) -> None:
        """Reject impossible settings up front; `world_size` adds the batch/parallel checks."""
        b, p, o = self.batch, self.parallel, self.optimizer
        if self.task not in TASKS:
            raise self._err("task", f"expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "diffusion":
            self.diffusion.validate(self.source)
        self.lora.validate(self.source)
        if self.lora.enabled and self.task != "sft":
            raise self._err("lora.rank", f"LoRA finetunes with task: sft, got task: {self.task}")
        if self.lora.enabled and self.parallel.pipeline_stages > 1:
            raise self._err("lora.rank", "LoRA is not supported with parallel.pipeline_stages > 1 yet")
        if self.lora.enabled and self.optimizer.name == "muon":
            # Muon picks matrices by name and shape: it would take the adapters and the frozen base.
            raise self._err("optimizer.name", "muon is not supported with lora yet; use adamw")
        try:
            self.data.validate()
        except UserError as exc:
            raise UserError(f"{self.source}: {exc}") from None
        _positive(self, "batch.micro_batch", b.micro_batch)
        _positive(self, "batch.global_batch", b.global_batch)
        if p.zero_stage not in (0, 1, 2, 3):
            raise self._err("parallel.zero_stage", f"expected 0, 1, 2 or 3, got {p.zero_stage}")
        _positive(self, "parallel.pipeline_stages", p.pipeline_stages)
        if p.pipeline_stages > 1 and p.zero_stage > 1:
            raise self._err(
                "parallel.zero_stage",
                f"ZeRO-{p.zero_stage} cannot be combined with pipeline parallelism "
                f"(pipeline_stages={p.pipeline_stages}); DeepSpeed allows ZeRO 0 or 1 with pipelines",
            )
        if p.offload_optimizer and p.zero_stage == 0:
            raise self._err("parallel.offload_optimizer", "needs parallel.zero_stage >= 1")
        if o.schedule not in SCHEDULES:
            raise self._err("optimizer.schedule", f"expected one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
        if o.lr <= 0:
            raise self._err("optimizer.lr", f"expected a number > 0, got {o.lr}")
        if o.min_lr < 0 or o.min_lr > o.lr:
            raise self._err("optimizer.min_lr", f"expected 0 <= min_lr <= lr (lr={o.lr}, min_lr={o.min_lr})")
        if o.warmup_steps < 0:
            raise self._err("optimizer.warmup_steps", "expected >= 0")
        if not 0.0 < o.decay_fraction <= 1.0:
            raise self._err("optimizer.decay_fraction", "expected 0 < decay_fraction <= 1")
        if len(o.betas) != 2 or not all(0.0 <= x < 1.0 for x in o.betas):
            raise self._err("optimizer.betas", f"expected two numbers in [0, 1), got {o.betas}")
        if o.grad_clip < 0:
            raise self._err("optimizer.grad_clip", f"expected >= 0 (0 disables clipping), got {o.grad_clip}")
        if o.weight_decay < 0:
            raise self._err("optimizer.weight_decay", f"expected >= 0, got {o.weight_decay}")
        if o.eps <= 0:
            raise self._err("optimizer.eps", f"expected a number > 0, got {o.eps}")
        if o.name not in OPTIMIZERS:
            raise self._err("optimizer.name", f"expected one of {', '.join(OPTIMIZERS)}, got {o.name!r}")
        if o.muon_lr <= 0:
            raise self._err("optimizer.muon_lr", f"expected a number > 0, got {o.muon_lr}")
        if not 0.0 <= o.muon_momentum < 1.0:
            raise self._err("optimizer.muon_momentum", f"expected a number in [0, 1), got {o.muon_momentum}")
        if o.name == "muon" and p.zero_stage > 0 and o.grad_clip > 0:
            # ZeRO 1-3 write Muon's orthogonalised update into the gradient before DeepSpeed takes
            # the global norm, so clipping shrinks the update itself (measured ~26x on the test
            # model) instead of the raw gradient: silently much smaller Muon steps.
            raise self._err("optimizer.grad_clip", f"muon under ZeRO-{p.zero_stage} needs 0 (DeepSpeed would "
                            f"clip the orthogonalised update, not the gradient), got {o.grad_clip}")
        prec = self.precision
        if prec.dtype not in DTYPES:
            raise self._err("precision.dtype", f"expected one of {', '.join(DTYPES)}, got {prec.dtype!r}")
        if prec.loss_scale < 0:
            raise self._err("precision.loss_scale", f"expected 0 (dynamic) or a positive scale, got {prec.loss_scale}")
        if not 0 <= prec.initial_scale_power <= MAX_SCALE_POWER:
            raise self._err("precision.initial_scale_power",
                            f"expected 0..{MAX_SCALE_POWER} (the scale starts at 2**power), got {prec.initial_scale_power}")
        if self.logging.peak_flops < 0:
            raise self._err("logging.peak_flops", f"expected >= 0 (0 = look up the GPU model), got {self.logging.peak_flops}")
        if (self.train.steps > 0) == (self.train.tokens > 0):
            raise self._err("train.steps", "set exactly one of train.steps or train.tokens (> 0)")
        self.checkpoint.validate(self.source)
        _positive(self, "logging.interval", self.logging.interval)
        if self.eval.interval < 0 or self.eval.batches < 0:
            raise self._err("eval.interval", "expected interval >= 0 and batches >= 0")
        bs = self.bad_steps
        if bs.spike_factor < 0 or (0 < bs.spike_factor <= 1):
            raise self._err("bad_steps.spike_factor", "expected 0 (off) or a factor > 1")
        _positive(self, "bad_steps.window", bs.window)
        _positive(self, "bad_steps.max_consecutive", bs.max_consecutive)
        if world_size is not None:
            self.validate_world(world_size)
            to_deepspeed_config(self, world_size)  # refuses raw overrides of what megalm sets

    def validate_accelerator(self, accelerator: str) -> None:
        """Settings the device kind rules out (`accelerator` as DeepSpeed's: "cuda" or "cpu")."""
        if accelerator == "cpu" and self.precision.dtype == "fp16":
            raise self._err("precision.dtype", "fp16 needs a GPU (DeepSpeed's CPU accelerator does not support "
                            "fp16); use bf16 or fp32 on a CPU-only run")

    def validate_world(self, world_size: int) -> None:
        pp = self.parallel.pipeline_stages
        if world_size % pp:
            raise self._err(
                "parallel.pipeline_stages",
                f"world size {world_size} is not a multiple of pipeline_stages={pp}",
            )
        dp, mb = self.dp_size(world_size), self.batch.micro_batch
        if self.batch.global_batch % (mb * dp):
            raise self._err(
                "batch.global_batch",
                f"must be a multiple of micro_batch × data-parallel size ({mb} × {dp}), "
                f"got {self.batch.global_batch}",
            )


def _positive(cfg: TrainConfig, key: str, value: int) -> None:
    if value <= 0:
        raise cfg._err(key, f"expected a positive number, got {value}")


# ---- generic dict -> dataclass with named errors ------------------------------------------
def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
            raise UserError(f"{source}: {key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{source}: {key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise UserError(f"{source}: {key}: unknown key (expected one of {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key, source)
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if part == "model" and i == 0 and isinstance(nxt, str):
            nxt = {"preset": nxt}  # `model=tiny` in YAML, `model.n_layers=2` on the CLI
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{source}: {'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
        node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def _example_or_path(path: str) -> str:
    """A file path as given, or the name of a shipped example config (`demo`, `gpt2-124m`)."""
    example = CONFIGS_DIR / f"{path}.yaml"
    return str(example) if not Path(path).exists() and "/" not in path and example.is_file() else path


def load_config(path: str | None, overrides: list[str] = (), *, world_size: int | None = None) -> TrainConfig:
    """Read YAML (or start from defaults when path is None), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    path = _example_or_path(path) if path else path
    source = Path(path).name if path else "config"
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"{path}: cannot read config ({exc.strerror}); shipped examples: "
                            f"{', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.yaml')))}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, text_value = item.split("=", 1)
        try:
            value = yaml.safe_load(text_value) if text_value else ""
        except yaml.YAMLError:
            value = text_value
        _set_dotted(raw, key.strip(), value, source)
    model = raw.get("model", {"preset": "tiny"})
    if isinstance(model, str):
        raw["model"] = {"preset": model}
    elif not isinstance(model, dict):
        raise UserError(f"{source}: model: expected a preset name or a mapping of model fields")
    cfg = _build(TrainConfig, raw, "", source)
    cfg.source = source
    cfg.validate(world_size)
    return cfg
