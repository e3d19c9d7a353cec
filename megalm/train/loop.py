"""The Trainer: batches in, DeepSpeed step, guard, eval, logs, checkpoints. One step reads whole.

Positions: `step` counts optimizer steps (applied or skipped); `data_step` counts global batches
drawn from the loader (it runs ahead of `step` after a bad data window is skipped). Both, the
loader state and every rank's RNG state go into the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.diagnose import CollectiveWatch
import megalm
from megalm.errors import UserError
from megalm.data.prefetch import Prefetcher
from megalm.engine.checkpointing import DeepSpeedCheckpointManager
from megalm.engine.tensor import clip_grads, grad_norm
from megalm.engine.runtime import (backward_factor, device_of, gathered, global_grad_norm, local_grad_sumsq,
                                   loss_scale)
from megalm.fsio import atomic_write
from megalm.train.build import ZERO0_OPTIMIZER, build, check_zero0_optimizer
from megalm.train.config import TrainConfig
from megalm.train.guard import StepGuard
from megalm.train.init_from import model_differences
from megalm.train.metrics import Metrics, json_safe, peak_memory_gib
from megalm.train.muon import check_resumable
from megalm.train.peak_flops import peak_flops
from megalm.train.signals import STOP_SIGNALS, StopRequests
from megalm.train.task import Batch, Task


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, task: Task, *, rank: int, world_size: int):
        self.cfg, self.task, self.rank, self.world = cfg, task, rank, world_size
        self.guard = StepGuard(cfg.bad_steps, stop_signals=STOP_SIGNALS)
        self.guard.loss_shares = cfg.parallel.sequence_parallel
        self.stops = StopRequests(self.guard, rank)
        self.b = build(cfg, task, self.guard, world_size)
        self.engine = self.b.engine
        self.device = device_of(self.engine)
        self.guard.device = self.device
        # Step s+1's batches are collated (pinned on a GPU) on a worker thread while step s runs.
        self.loader = Prefetcher(task.build_loader("train", self.b.dp_rank, self.b.dp_world),
                                 pin_memory=self.device.type == "cuda")
        self._it = iter(self.loader)
        # Built (and so validated) now: an impossible eval split fails before step 1, not after
        # the last one.
        self.eval_loader = (task.build_eval_loader(self.b.dp_rank, self.b.dp_world)
                            if cfg.eval.batches > 0 else None)
        # Optional per-task extra state (e.g. diffusion's EMA): `after_step(step, applied)` after
        # each optimizer step, `state_dict`/`load_state_dict` through the checkpoint's client state.
        self.task_hook = task.attach(self.engine, self.b.dp_rank, self.b.dp_world)
        self.ckpt = DeepSpeedCheckpointManager(dataclasses.replace(cfg.checkpoint, dir=cfg.checkpoint_dir()),
                                               rank=rank, world_size=world_size)
        self.ckpt.check_space(self.engine)
        self.total_steps = cfg.total_steps()
        self.tokens_per_step = cfg.batch.global_batch * cfg.data.seq_len
        self.step = self.data_step = self.tokens = self.rollbacks = 0
        self.skip_plan: dict[int, int] = {}  # data_step -> global batches to skip before drawing it
        self.last_eval = float("nan")
        self._saved_step = -1
        # The guard's reduction carries the gradient norm: ZeRO-1/2/3 the partitions' shares, ZeRO-0
        # (megalm steps it: megalm_zero0) the whole norm, taken from every rank's TP slices.
        self._guard_norm = cfg.megalm_grad_norm()
        self._zero0 = cfg.megalm_zero0()
        # DeepSpeed reports no grad norm for Muon's fp32 data parallelism; compute it ourselves there.
        self._own_grad_norm = (not self.b.pipeline and cfg.parallel.zero_stage == 0
                               and cfg.precision.dtype == "fp32" and not self._zero0)
        self._gnorm: torch.Tensor | None = None  # stays on the device until a log line reads it
        self._backward_factor = backward_factor(self.engine)  # ZeRO-3 × sequence parallelism: N
        self.peak_flops = peak_flops(cfg.precision.dtype, cfg.logging.peak_flops)
        if self.peak_flops is None and torch.cuda.is_available() and rank == 0:
            _warn(f"no peak FLOP/s known for {torch.cuda.get_device_name()} in {cfg.precision.dtype}: MFU is "
                  f"not logged; set logging.peak_flops (per device) to get it")
        self.guard.watch = CollectiveWatch.for_job(rank, world_size)  # names ranks missing a collective

    # ---- state -------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        """Collective (RNG states are gathered so each rank finds its own after a restart)."""
        rngs: list[Any] = [None] * self.world
        dist.all_gather_object(rngs, _rng_state())
        data = dict(self.task.fingerprint())
        tokenizer = self.task.tokenizer_model()
        if tokenizer is not None:  # lets `megalm sample` work after the shards moved
            data["tokenizer_model"] = tokenizer
        return {"step": self.step, "data_step": self.data_step, "tokens": self.tokens,
                "loader": self.loader.state_dict(), "rng": rngs, "guard": self.guard.state_dict(),
                "skip_plan": dict(self.skip_plan), "rollbacks": self.rollbacks,
                "config": self.cfg.to_dict(), "data": data, "world_size": self.world,
                "megalm_version": megalm.__version__,
                # ZeRO-0's optimizer state is megalm's AdamW's (fp32 masters of bf16 params inside)
                **({ZERO0_OPTIMIZER: "megalm"} if self._zero0 else {}),
                # how the weights are split over tensor-parallel ranks: readers put them together
                **({"tensor_parallel": self.b.tp_plan} if self.b.tp_plan else {}),
                **({"task_state": self.task_hook.state_dict()} if self.task_hook.carries_state else {})}

    def restore(self, cs: dict[str, Any]) -> None:
        fp, saved = self.task.fingerprint(), cs.get("data", {})
        if saved.get("tokenizer_sha256") not in (None, fp.get("tokenizer_sha256")):
            raise UserError(f"checkpoint tokenizer sha256 {saved['tokenizer_sha256'][:12]}… differs from the "
                            f"data's ({fp['tokenizer_sha256'][:12]}…): data.paths must use the same tokenizer")
        self.step, self.data_step, self.tokens = int(cs["step"]), int(cs["data_step"]), int(cs["tokens"])
        self.loader.load_state_dict(cs["loader"])
        self._it = iter(self.loader)
        self.guard.load_state_dict(cs["guard"])
        self.skip_plan = {int(k): int(v) for k, v in cs.get("skip_plan", {}).items()}
        self.rollbacks = int(cs.get("rollbacks", 0))
        rngs = cs["rng"]
        # Same rank count: each rank gets exactly its own state back; otherwise reuse cyclically.
        _set_rng_state(rngs[self.rank % len(rngs)])
        if self.task_hook.carries_state:
            if "task_state" not in cs:
                raise UserError("checkpoint has no task_state (saved by another task); cannot resume this task")
            self.task_hook.load_state_dict(cs["task_state"])

    def resume(self, mode: str) -> bool:
        """Collective: take the run lock, then continue from `mode` (auto | none | a checkpoint
        folder). On a refusal the lock is released again, so the process may try otherwise."""
        try:
            found = self.ckpt.resume(self.engine, mode, check=self._resumable)
            if found is None:
                return False
            self.restore(found[0])
        except BaseException:
            self.ckpt.close()
            raise
        self._saved_step = self.step
        if self.rank == 0:
            print(f"resumed from step {self.step} ({found[1]})", flush=True)
        return True

    def _resumable(self, cs: dict[str, Any]) -> None:
        self._same_model(cs)
        check_zero0_optimizer(self.cfg, cs)
        check_resumable(cs.get("config", {}), int(cs.get("world_size", self.world)), self.b.dp_world)

    def _same_model(self, cs: dict[str, Any]) -> None:
        """Refuse, naming each differing field, a checkpoint of another model shape (before
        DeepSpeed would fail deep inside load_state_dict)."""
        data, fp = cs.get("data", {}), self.task.fingerprint()
        saved, ours = data.get("model_config"), fp.get("model_config")
        if saved is None or ours is None:
            return
        # A task whose model gained a field with a new default reads an older checkpoint's
        # config as it was trained (diffusion: freq_shift), so the user can name the old value.
        saved = self.task.saved_model_config(saved)
        diffs = model_differences(saved, ours)  # fields that change what the weights mean
        if data.get("lora") != fp.get("lora"):
            diffs.append(f"lora is {data.get('lora')} there, {fp.get('lora')} here")
        if not diffs:
            return
        raise UserError(f"a checkpoint of another model ({'; '.join(diffs)}): resume with the model settings it "
                        f"was trained with, or start a new run (another name= or checkpoint.dir=, or --resume none "
                        f"with a fresh checkpoint.dir)")

    def save(self) -> None:
        # A task's own files (LoRA adapters alone) go inside the checkpoint, published with it.
        self.ckpt.save(self.engine, self.step, self.client_state(), files=self.task_hook.checkpoint_files())
        self._saved_step = self.step

    # ---- data --------------------------------------------------------------------------------
    def next_batch(self) -> list[Batch]:
        skip = self.skip_plan.pop(self.data_step + 1, 0)
        if skip:
            self.loader.skip(skip)
            self._it = iter(self.loader)
            self.data_step += skip
            if self.rank == 0:
                _warn(f"skipped {skip} global batches of data after bad steps (now at batch {self.data_step})")
        micro = next(self._it)
        self.data_step += 1
        if self.cfg.debug.trace_batches and self.b.is_first_stage:
            self._trace(micro)
        return [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro]

    def _trace(self, micro: list[Batch]) -> None:
        rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for mb in micro for row in mb["input_ids"]]
        os.makedirs(self.cfg.debug.trace_batches, exist_ok=True)
        with open(os.path.join(self.cfg.debug.trace_batches, f"rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.step + 1, "data_step": self.data_step, "dp_rank": self.b.dp_rank,
                                "samples": rows}) + "\n")

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self, micro: list[Batch]) -> None:
        self.guard.begin_step(poison=self.data_step in self.cfg.debug.nan_at_data_steps, step=self.step + 1)
        if self.b.pipeline:
            self.engine.train_batch(data_iter=iter([self.task.pipeline_batch(mb) for mb in micro]))
        else:
            for i, mb in enumerate(micro):
                loss = self.guard.record(self.task.loss(self.engine, mb))
                self.engine.backward(loss * self._backward_factor if self._backward_factor != 1 else loss)
                if i == len(micro) - 1:
                    # Before the optimizer runs, on every rank; carries the gradient norm.
                    self.guard.decide(self._grad_sumsq_share())
                    if self._zero0:
                        clip_grads(self.engine.module, self.guard.grad_norm, self.cfg.optimizer.grad_clip)
                    if self._own_grad_norm:
                        self._gnorm = grad_norm(self.engine.module, self.b.tp_plan)
                self.engine.step()
        if not self.guard.decided:  # a DeepSpeed that stepped without our hook would have skipped the check
            raise RuntimeError("step guard: no decision this step (DeepSpeed ran no optimizer step?)")
        self.step += 1
        if not self.guard.last_bad:
            self.tokens += self.tokens_per_step
        self.task_hook.after_step(self.step, applied=not self.guard.last_bad)

    def _grad_sumsq_share(self) -> torch.Tensor | None:
        """This rank's share of the squared global gradient norm (shares add up over all ranks)."""
        if self._guard_norm:  # the rank's ZeRO partition
            return local_grad_sumsq(self.engine)
        if self._zero0:  # every rank holds the whole reduced gradients
            return grad_norm(self.engine.module, self.b.tp_plan).square() / self.world
        return None

    @torch.no_grad()
    def evaluate(self) -> tuple[float, list[float]]:
        """(blended loss, per-source losses): the mean loss over the first `eval.batches` micro
        batches per rank of each source's valid split, and their mean weighted like training's
        blend. Losses stay on the device until one read at the end."""
        if self.eval_loader is None:
            return float("nan"), []
        k_sources = self.eval_loader.num_sources
        sums = torch.zeros(k_sources, 2, dtype=torch.float64, device=self.device)  # (loss sum, count)
        self.guard.recording = False
        self.engine.eval()
        try:
            for k in range(k_sources):
                micro = [{n: v.to(self.device) for n, v in mb.items()}
                         for _, mb in zip(range(self.cfg.eval.batches), self.eval_loader.source_batches(k))]
                if self.b.pipeline:  # eval_batch takes gradient_accumulation_steps micro batches at a time
                    gas = self.engine.gradient_accumulation_steps()
                    for i in range(0, len(micro) - gas + 1, gas):
                        chunk = [self.task.pipeline_batch(mb) for mb in micro[i:i + gas]]
                        sums[k, 0] += self.engine.eval_batch(iter(chunk)).detach().double() * gas  # DP-averaged
                        sums[k, 1] += gas
                else:
                    for mb in micro:  # a sequence-parallel rank's loss is its share of the micro batch's
                        sums[k, 0] += self.task.loss(self.engine, mb).detach().double()
                        sums[k, 1] += 1 / self.cfg.parallel.sequence_parallel
        finally:
            self.engine.train()
            self.guard.recording = True
        if not self.b.pipeline:
            dist.all_reduce(sums)
        per_source = [t / c if c else float("nan") for t, c in sums.tolist()]
        weights = self.loader.source_weights()
        blended = sum(w * x for w, x in zip(weights, per_source)) / sum(weights)
        return blended, per_source

    def roll_back(self) -> None:
        """M bad steps in a row: reload the newest checkpoint and plan to skip the bad data window."""
        n = self.guard.consecutive_bad
        first_bad = self.data_step - n + 1
        skipped = self.guard.skipped_total
        self.ckpt.wait()
        cs = self.ckpt.load(self.engine)
        if cs is not None:
            self.restore(cs)
        elif self.rank == 0:
            _warn("no checkpoint to roll back to; the bad steps were not applied, continuing")
        self.guard.skipped_total, self.guard.consecutive_bad = skipped, 0
        # The checkpoint may sit inside the bad window (saved between skipped steps): skip the rest.
        start = max(first_bad, self.data_step + 1)
        self.skip_plan[start] = first_bad + n - start
        self.rollbacks += 1
        if self.rank == 0:
            _warn(f"{n} bad steps in a row: rolled back to step {self.step}; data batches {first_bad}.."
                  f"{first_bad + n - 1} will be skipped")

    # ---- the run -----------------------------------------------------------------------------
    def _grad_norm(self) -> float:
        if self._own_grad_norm:
            return float(self._gnorm) if self._gnorm is not None else float("nan")
        if self._guard_norm or self._zero0:
            return self.guard.grad_norm
        g = global_grad_norm(self.engine)
        return g if g is not None else float("nan")

    def _loss_scale(self) -> float:
        return loss_scale(self.engine)

    def _log_train(self, metrics: Metrics, clock: dict[str, float]) -> None:
        now = time.perf_counter()
        tps = self.tokens_per_step * (self.step - clock["step"]) / max(now - clock["t"], 1e-9)
        flops = tps * self.b.flops_per_token
        rate = max(self.step - clock["start_step"], 1e-9) / max(now - clock["start_t"], 1e-9)
        metrics.write("train", {
            "step": self.step, "loss": self.guard.last_loss, "lr": self.engine.get_lr()[0],
            "grad_norm": self._grad_norm(), "tokens_per_s": tps, "flops_per_s": flops,
            "mfu": flops / (self.peak_flops * self.world) if self.peak_flops else None,
            "memory_gib": peak_memory_gib(),
            "eta_s": (self.total_steps - self.step) / rate, "skipped_steps": self.guard.skipped_total,
            "rollbacks": self.rollbacks, "loss_scale": self._loss_scale(), "tokens": self.tokens,
            "data_step": self.data_step})
        clock.update(t=now, step=self.step)

    def _eval(self, metrics: Metrics) -> None:
        self.last_eval, per_source = self.evaluate()
        record: dict[str, Any] = {"step": self.step, "loss": self.last_eval}
        if len(per_source) > 1:
            record.update({f"loss_source{k}": x for k, x in enumerate(per_source)})
        metrics.write("eval", record)

    def run(self) -> dict[str, Any]:
        cfg, start = self.cfg, self.step
        metrics = Metrics(str(cfg.run_dir()), cfg.tensorboard_dir(), self.total_steps, self.step,
                          enabled=self.rank == 0, progress=cfg.logging.progress)
        now = time.perf_counter()
        clock = {"t": now, "step": self.step, "start_t": now, "start_step": self.step}
        self.stops.install()
        try:
            while self.step < self.total_steps:
                if cfg.debug.wait_at_step == self.step + 1:
                    self.stops.wait_for(cfg.debug.wait_for_signals,
                                        cfg.run_dir() / f"waiting-step{self.step + 1}.rank{self.rank}")
                self.train_step(self.next_batch())
                metrics.advance()
                if self.step % cfg.logging.interval == 0 or self.step == self.total_steps:
                    self._log_train(metrics, clock)
                if self.guard.must_roll_back:
                    self.roll_back()
                    metrics.set_position(self.step)
                    now = time.perf_counter()
                    clock = {"t": now, "step": self.step, "start_t": now, "start_step": self.step}
                    continue
                # The final eval runs after the final save (below), so its failure loses no training.
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < self.total_steps:
                    self._eval(metrics)
                if self.step % cfg.checkpoint.interval == 0 and self.step < self.total_steps:
                    self.save()
                if cfg.debug.max_steps_this_run and self.step - start >= cfg.debug.max_steps_this_run:
                    break
                if self.guard.stop_signal:  # decided in this step's one reduction, on every rank
                    if self.rank == 0:
                        _warn(f"signal {self.guard.stop_signal}: checkpointing at step {self.step} and stopping")
                    break
            if self._saved_step != self.step:
                self.save()
            self.ckpt.wait()
            if self.step >= self.total_steps and cfg.eval.batches:
                self._eval(metrics)
        finally:
            metrics.close()
            self.stops.restore()
            self.close()
        return self._summary()

    def close(self) -> None:
        """Release what the trainer holds besides the engine: the hang watch (a thread polling a
        store client) and the run lock. `run` ends with it; whoever drives steps by hand calls it:
        a watch thread left inside the store client when the process exits aborts it."""
        self.guard.watch.close()
        self.ckpt.close()
        self.loader.close()

    def _summary(self) -> dict[str, Any]:
        summary = {"step": self.step, "finished": self.step >= self.total_steps, "tokens": self.tokens,
                   "last_loss": self.guard.last_loss, "eval_loss": self.last_eval,
                   "skipped_steps": self.guard.skipped_total, "rollbacks": self.rollbacks,
                   "weights_sha256": self.weights_digest(), "world_size": self.world,
                   "stopped_by_signal": self.guard.stop_signal}
        if self.rank == 0:
            self.cfg.run_dir().mkdir(parents=True, exist_ok=True)
            atomic_write(str(self.cfg.run_dir() / "summary.json"), json.dumps(json_safe(summary), indent=1))
        return summary

    def weights_digest(self) -> str:
        """Collective: sha256 over every rank's fp32 view of its module parameters (gathered for
        ZeRO-3), so two runs with the same layout can be compared bit for bit."""
        module = self.engine.module
        params = list(module.named_parameters())
        h = hashlib.sha256()
        for name, p in params:
            with gathered([p], self.cfg.parallel.zero_stage == 3):  # one at a time: never the whole model
                h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, h.hexdigest())
        # DP replicas hold equal weights; keep one digest per pipeline stage.
        unique = list(dict.fromkeys(digests))
        return hashlib.sha256("".join(unique).encode()).hexdigest()

