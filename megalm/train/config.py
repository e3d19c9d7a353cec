"""Training config: YAML -> typed dataclasses, validated before any process group or model exists.

The DeepSpeed config is generated from this (`megalm.engine.config`), so a setting is written once.
Errors are one `UserError` line naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megalm import CONFIGS_DIR
from megalm.checkpoint.config import CheckpointConfig
from megalm.config import INTERNAL, Invalid, Section, apply_overrides, build, check_fields, read_yaml
from megalm.data.sources import DataConfig
from megalm.diffusion.config import DiffusionSection
from megalm.engine.config import to_deepspeed_config
from megalm.errors import UserError
from megalm.models.lora import LoraConfig

if TYPE_CHECKING:
    from megalm.train.task import Task

SCHEDULES = ("cosine", "linear", "wsd", "constant")
MAX_SCALE_POWER = 32  # fp16 dynamic loss scale starts at most at 2**32
DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "muon")
# Every task, by its `task:` value: the one table (megalm.train.task.build_task builds from it).
# Named, not imported: a run imports only its own task's module (diffusion's pulls in image code).
TASKS = {"lm": "megalm.train.task:LMTask", "sft": "megalm.train.sft:SFTTask",
         "diffusion": "megalm.train.diffusion:DiffusionTask"}


@dataclass
class OptimizerSection(Section):
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

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise Invalid("schedule", f"expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.lr <= 0:
            raise Invalid("lr", f"expected a number > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise Invalid("min_lr", f"expected 0 <= min_lr <= lr (lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_steps < 0:
            raise Invalid("warmup_steps", "expected >= 0")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise Invalid("decay_fraction", "expected 0 < decay_fraction <= 1")
        if len(self.betas) != 2 or not all(0.0 <= x < 1.0 for x in self.betas):
            raise Invalid("betas", f"expected two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise Invalid("grad_clip", f"expected >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            raise Invalid("weight_decay", f"expected >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            raise Invalid("eps", f"expected a number > 0, got {self.eps}")
        if self.name not in OPTIMIZERS:
            raise Invalid("name", f"expected one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.muon_lr <= 0:
            raise Invalid("muon_lr", f"expected a number > 0, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise Invalid("muon_momentum", f"expected a number in [0, 1), got {self.muon_momentum}")


@dataclass
class BatchSection(Section):
    micro_batch: int = 4  # sequences per rank per forward
    global_batch: int = 32  # sequences per optimizer step, all ranks

    def validate(self) -> None:
        positive(self, "micro_batch", "global_batch")


@dataclass
class ParallelSection(Section):
    zero_stage: int = 1
    pipeline_stages: int = 1
    # Ulysses (DeepSpeed's DistributedAttention): each rank of a group holds seq_len/N positions of
    # every sequence; attention exchanges heads for positions (all-to-all). world = DP × N.
    sequence_parallel: int = 1
    # Megatron-style tensor parallelism by DeepSpeed AutoTP: the attention and MLP matrices of each
    # block are split over N ranks (column then row, one all-reduce each in forward and backward).
    # Composes with sequence_parallel (ZeRO 1/2): world = DP × SP × TP.
    tensor_parallel: int = 1
    activation_checkpointing: bool = False  # recompute every block in backward (done by the model)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise Invalid("zero_stage", f"expected 0, 1, 2 or 3, got {self.zero_stage}")
        positive(self, "pipeline_stages", "sequence_parallel", "tensor_parallel")
        if self.tensor_parallel > 1 and self.pipeline_stages > 1:
            raise Invalid("tensor_parallel", f"tensor_parallel={self.tensor_parallel} cannot be combined with "
                          f"pipeline_stages={self.pipeline_stages} (DeepSpeed's pipeline engine builds its own "
                          f"model-parallel grid); use one of them")
        if self.sequence_parallel > 1 and self.pipeline_stages > 1:
            raise Invalid("sequence_parallel", f"sequence parallelism ({self.sequence_parallel}) cannot be combined "
                          f"with pipeline_stages={self.pipeline_stages} (DeepSpeed's pipeline engine takes no "
                          f"sequence-parallel groups); use one of them")
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            raise Invalid("zero_stage", f"ZeRO-{self.zero_stage} cannot be combined with pipeline parallelism "
                          f"(pipeline_stages={self.pipeline_stages}); DeepSpeed allows ZeRO 0 or 1 with pipelines")
        if self.sequence_parallel > 1 and self.tensor_parallel > 1 and self.zero_stage in (0, 3):
            # ZeRO-3 partitions parameters over DeepSpeed's data-parallel group, which under AutoTP is
            # its own groups module's: megalm widens that group to data × sequence ranks only for
            # sequence parallelism alone (megalm.engine.sequence). ZeRO-0: not tested together.
            raise Invalid("zero_stage", f"ZeRO-{self.zero_stage} cannot be combined with tensor_parallel="
                          f"{self.tensor_parallel} and sequence_parallel={self.sequence_parallel} together; "
                          f"use zero_stage 1 or 2")
        if self.offload_optimizer and self.zero_stage == 0:
            raise Invalid("offload_optimizer", "needs parallel.zero_stage >= 1")


@dataclass
class PrecisionSection(Section):
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    loss_scale: float = 0.0  # fp16 only; 0 = dynamic loss scaling
    initial_scale_power: int = 16  # fp16 dynamic scaling starts at 2**this (0..MAX_SCALE_POWER)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise Invalid("dtype", f"expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.loss_scale < 0:
            raise Invalid("loss_scale", f"expected 0 (dynamic) or a positive scale, got {self.loss_scale}")
        if not 0 <= self.initial_scale_power <= MAX_SCALE_POWER:
            raise Invalid("initial_scale_power", f"expected 0..{MAX_SCALE_POWER} (the scale starts at "
                          f"2**power), got {self.initial_scale_power}")


@dataclass
class LoggingSection(Section):
    interval: int = 10
    tensorboard_dir: str = ""  # default: runs/<name>/tb
    peak_flops: float = 0.0  # per device; 0 = from the GPU model and dtype (train/peak_flops.py); no MFU on CPU
    progress: bool = True  # tqdm bar on rank 0 (plain lines otherwise)

    def validate(self) -> None:
        if self.peak_flops < 0:
            raise Invalid("peak_flops", f"expected >= 0 (0 = look up the GPU model), got {self.peak_flops}")
        positive(self, "interval")


@dataclass
class EvalSection(Section):
    interval: int = 0  # 0 disables periodic eval (still runs at the end when batches > 0)
    batches: int = 8

    def validate(self) -> None:
        if self.interval < 0 or self.batches < 0:
            raise Invalid("interval", "expected interval >= 0 and batches >= 0")


@dataclass
class TrainSection(Section):
    steps: int = 0  # optimizer steps; or set tokens
    tokens: int = 0
    seed: int = 1234  # model initialisation (the data order has its own data.seed)

    def validate(self) -> None:
        if (self.steps > 0) == (self.tokens > 0):
            raise Invalid("steps", "set exactly one of train.steps or train.tokens (> 0)")


@dataclass
class BadStepsSection(Section):
    spike_factor: float = 0.0  # step is bad when loss > k x running mean; 0 = only NaN/inf
    window: int = 20  # steps in the running mean
    max_consecutive: int = 5  # this many bad steps in a row -> roll back and skip the data

    def validate(self) -> None:
        if self.spike_factor < 0 or (0 < self.spike_factor <= 1):
            raise Invalid("spike_factor", "expected 0 (off) or a factor > 1")
        positive(self, "window", "max_consecutive")


@dataclass
class DebugSection(Section):
    # Test hooks that act on the data/loss, never inside the model.
    nan_at_data_steps: list[int] = field(default_factory=list)  # 1-based global batch number
    trace_batches: str = ""  # dir: each rank appends (step, sample fingerprints) JSON lines
    max_steps_this_run: int = 0  # stop (after checkpointing) once this many steps ran in this process
    # Before step N each rank writes runs/<name>/waiting-stepN.rank<r> and blocks until it has
    # received `wait_for_signals` signals: tests signal a run at an exact step without sleeping.
    wait_at_step: int = 0
    wait_for_signals: int = 1


@dataclass
class TrainConfig(Section):
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
    source: str = field(default="config", metadata=INTERNAL)  # the file, for error messages

    # ---- derived -------------------------------------------------------------------------
    def model_parallel_size(self) -> int:
        """Ranks that share one data-parallel replica's work (pipeline × sequence × tensor parallel)."""
        p = self.parallel
        return p.pipeline_stages * p.sequence_parallel * p.tensor_parallel

    def dp_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def grad_accum(self, world_size: int) -> int:
        return self.batch.global_batch // (self.batch.micro_batch * self.dp_size(world_size))

    def megalm_grad_norm(self) -> bool:
        """Whether megalm, not DeepSpeed, takes the global gradient norm and checks it for inf/NaN:
        ZeRO-1/2/3 with AdamW in bf16/fp32, no pipeline, no offload. DeepSpeed there runs a norm
        (ZeRO-1/2 in bf16 also an overflow check: ~10 kernels) and a host read per parameter;
        megalm takes one multi-tensor norm over the reduced partition gradients, folded into the
        step's one reduction, and DeepSpeed clips with it."""
        p = self.parallel
        # Under tensor parallelism the replicated parameters' gradients lie on every TP rank; summing
        # the ranks' shares would count them N times. DeepSpeed's own norm knows which are split.
        return (p.zero_stage in (1, 2, 3) and p.pipeline_stages == 1 and not p.offload_optimizer
                and p.tensor_parallel == 1
                and self.optimizer.name == "adamw" and self.precision.dtype in ("bf16", "fp32"))

    def megalm_zero0(self) -> bool:
        """Whether megalm, not DeepSpeed, runs ZeRO-0's optimizer side: AdamW without pipeline
        stages in bf16/fp32. DeepSpeed then only all-reduces the whole gradients; megalm's AdamW
        keeps the fp32 master weights of bf16 params, and megalm takes the gradient norm (one
        multi-tensor norm, checked for inf/NaN in the step's one reduction) and clips with it.
        DeepSpeed's own bf16 wrapper there checks, norms and copies every parameter with a host
        read each (~2x the kernels of a plain loop, benchmarks/opcount_cpu.py)."""
        p = self.parallel
        return (p.zero_stage == 0 and p.pipeline_stages == 1 and self.optimizer.name == "adamw"
                and self.precision.dtype in ("bf16", "fp32"))

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

    def validate(self) -> None:
        """Checks across sections (each section has checked its own values)."""
        if self.task not in TASKS:
            raise Invalid("task", f"expected one of {', '.join(TASKS)}, got {self.task!r}")
        model_fields = task_class(self.task).model_config_class
        if model_fields is not None:  # typed per task: each key a field of the task's model config
            self.model = check_fields(model_fields, self.model, self.source, "model", extra=("preset",))
        if self.lora.enabled and self.task != "sft":
            raise Invalid("lora.rank", f"LoRA finetunes with task: sft, got task: {self.task}")
        if self.lora.enabled and self.parallel.pipeline_stages > 1:
            raise Invalid("lora.rank", "LoRA is not supported with parallel.pipeline_stages > 1 yet")
        if self.lora.enabled and self.optimizer.name == "muon":
            # Muon picks matrices by name and shape: it would take the adapters and the frozen base.
            raise Invalid("optimizer.name", "muon is not supported with lora yet; use adamw")
        sp = self.parallel.sequence_parallel
        if sp > 1 and not task_class(self.task).sequence_parallel:
            raise Invalid("parallel.sequence_parallel", f"task {self.task} does not run sequence-parallel; "
                          f"expected 1, got {sp}")
        if sp > 1 and self.optimizer.name == "muon":
            raise Invalid("optimizer.name", "muon is not supported with parallel.sequence_parallel > 1 yet; "
                          "use adamw")
        tp = self.parallel.tensor_parallel
        if tp > 1 and not task_class(self.task).tensor_parallel:
            raise Invalid("parallel.tensor_parallel", f"task {self.task} does not run tensor-parallel; "
                          f"expected 1, got {tp}")
        if tp > 1 and self.optimizer.name == "muon":
            raise Invalid("optimizer.name", "muon is not supported with parallel.tensor_parallel > 1 yet; use adamw")
        if tp > 1 and self.lora.enabled:
            raise Invalid("lora.rank", "LoRA is not supported with parallel.tensor_parallel > 1 yet")
        if self.data.seq_len % sp:
            raise Invalid("data.seq_len", f"{self.data.seq_len} positions do not split evenly over "
                          f"parallel.sequence_parallel={sp}")
        o, zero = self.optimizer, self.parallel.zero_stage
        if o.name == "muon" and zero > 0 and o.grad_clip > 0:
            # ZeRO 1-3 write Muon's orthogonalised update into the gradient before DeepSpeed takes
            # the global norm, so clipping shrinks the update itself (measured ~26x on the test
            # model) instead of the raw gradient: silently much smaller Muon steps.
            raise Invalid("optimizer.grad_clip", f"muon under ZeRO-{zero} needs 0 (DeepSpeed would "
                          f"clip the orthogonalised update, not the gradient), got {o.grad_clip}")

    def validate_accelerator(self, accelerator: str) -> None:
        """Settings the device kind rules out (`accelerator` as DeepSpeed's: "cuda" or "cpu")."""
        if accelerator == "cpu" and self.precision.dtype == "fp16":
            raise self._err("precision.dtype", "fp16 needs a GPU (DeepSpeed's CPU accelerator does not support "
                            "fp16); use bf16 or fp32 on a CPU-only run")

    def validate_world(self, world_size: int) -> None:
        p = self.parallel
        if world_size % self.model_parallel_size():
            key = ("parallel.tensor_parallel" if p.tensor_parallel > 1 else
                   "parallel.sequence_parallel" if p.sequence_parallel > 1 else "parallel.pipeline_stages")
            raise self._err(key, f"world size {world_size} is not a multiple of pipeline_stages × sequence_parallel "
                            f"× tensor_parallel ({p.pipeline_stages} × {p.sequence_parallel} × {p.tensor_parallel})")
        dp, mb = self.dp_size(world_size), self.batch.micro_batch
        if self.batch.global_batch % (mb * dp):
            raise self._err(
                "batch.global_batch",
                f"must be a multiple of micro_batch × data-parallel size ({mb} × {dp}), "
                f"got {self.batch.global_batch}",
            )


def positive(section: Section, *keys: str) -> None:
    for key in keys:
        if getattr(section, key) <= 0:
            raise Invalid(key, f"expected a positive number, got {getattr(section, key)}")


def task_class(name: str) -> type[Task]:
    """The Task subclass registered for `task: name` in TASKS."""
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _example_or_path(path: str) -> str:
    """A file path as given, or the name of a shipped example config (`demo`, `gpt2-124m`)."""
    example = CONFIGS_DIR / f"{path}.yaml"
    return str(example) if not Path(path).exists() and "/" not in path and example.is_file() else path


def load_config(path: str | None, overrides: list[str] = (), *, world_size: int | None = None) -> TrainConfig:
    """Read YAML (or start from defaults when path is None), apply `a.b=value` overrides, validate;
    with `world_size`, also the batch/parallel checks that need it."""
    raw: dict[str, Any] = {}
    path = _example_or_path(path) if path else path
    source = Path(path).name if path else "config"
    if path:
        if not Path(path).exists():
            raise UserError(f"{path}: cannot read config (no such file); shipped examples: "
                            f"{', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.yaml')))}")
        raw = read_yaml(path, name=source)
    _preset_shorthand(raw, source)
    for item in overrides:
        apply_overrides(raw, [item], source)
        _preset_shorthand(raw, source)  # `model=gpt2-124m model.n_layers=2` on the command line
    raw.setdefault("model", {"preset": "tiny"})
    cfg = build(TrainConfig, raw, source, internal={"source": source})
    if world_size is not None:
        cfg.validate_world(world_size)
        to_deepspeed_config(cfg, world_size)  # refuses raw overrides of what megalm sets
    return cfg


def _preset_shorthand(raw: dict[str, Any], source: str) -> None:
    """`model: NAME` stands for `model: {preset: NAME}`."""
    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = {"preset": model}
    elif model is not None and not isinstance(model, dict):
        raise UserError(f"{source}: model: expected a preset name or a mapping of model fields")
