"""The trainer's view of the data: per-step lists of micro batches, data-parallel sharded,
with exact resume.

Optimizer step s consumes global samples [P, P + global_batch) where P is the position (samples
consumed so far); rank r of W takes the r-th contiguous slice of global_batch / W samples and
cuts it into micro batches. The position is independent of W, so a checkpoint taken with 2
ranks resumes on 1 (or 4) ranks with no sample repeated or skipped, as long as the global batch
divides evenly. There is no read-ahead: the position always equals what the trainer has taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megalm.data.sources import DataConfig, Sources
from megalm.errors import UserError

STATE_VERSION = 1
MicroBatch = dict[str, torch.Tensor]


def _check_parallel(global_batch: int, micro_batch: int, dp_rank: int, dp_world: int) -> None:
    for key, val in (("global_batch", global_batch), ("micro_batch", micro_batch), ("dp_world", dp_world)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise UserError(f"{key}: expected an integer >= 1, got {val!r}")
    if not 0 <= dp_rank < dp_world:
        raise UserError(f"dp_rank: expected 0 <= dp_rank < dp_world={dp_world}, got {dp_rank}")
    if global_batch % (micro_batch * dp_world):
        raise UserError(
            f"global_batch: {global_batch} is not a multiple of micro_batch ({micro_batch}) x data-parallel "
            f"ranks ({dp_world}); gradient accumulation needs a whole number of micro batches per rank"
        )


class _TokenizerFacade:
    """Exposes the data's tokenizer facts; the model and sampler must agree with them."""

    sources: Sources

    @property
    def tokenizer_path(self) -> str:
        return self.sources.tokenizer.path

    @property
    def tokenizer_sha256(self) -> str:
        return self.sources.tokenizer.sha256

    @property
    def vocab_size(self) -> int:
        return self.sources.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.sources.tokenizer.eos_id


class TrainLoader(_TokenizerFacade):
    """Infinite iterator: each `next()` is one optimizer step's list of micro-batch dicts."""

    def __init__(self, sources: Sources, global_batch: int, micro_batch: int, dp_rank: int, dp_world: int):
        _check_parallel(global_batch, micro_batch, dp_rank, dp_world)
        self.sources = sources
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.grad_accum = global_batch // (micro_batch * dp_world)
        self.samples_consumed = 0
        self.steps = 0  # optimizer steps taken or skipped since the start of the run

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        return self

    def __next__(self) -> list[MicroBatch]:
        batches = self.peek()
        self.samples_consumed += self.global_batch
        self.steps += 1
        return batches

    def rank_sample_range(self) -> range:
        """Global sample indices this rank takes in the next step."""
        per_rank = self.global_batch // self.dp_world
        start = self.samples_consumed + self.dp_rank * per_rank
        return range(start, start + per_rank)

    def peek(self) -> list[MicroBatch]:
        """The next step's micro batches for this rank, without advancing."""
        rng = self.rank_sample_range()
        windows = self.sources.windows(rng.start, len(rng))
        mb = self.micro_batch
        return [self.sources.collate(windows[i : i + mb]) for i in range(0, len(windows), mb)]

    def skip(self, n_steps: int) -> None:
        """Skip the next n_steps optimizer steps' samples (e.g. a bad data window after a rollback)."""
        if n_steps < 0:
            raise ValueError(f"skip: n_steps must be >= 0, got {n_steps}")
        self.samples_consumed += n_steps * self.global_batch
        self.steps += n_steps

    def source_weights(self) -> list[float]:
        """Each source's share of the training samples (the blend actually used)."""
        return self.sources.blend.weights

    def epochs(self) -> list[float]:
        """Passes made over each source so far (1.5 = half-way through the second pass)."""
        used = self.sources.consumed_per_source(self.samples_consumed)
        return [u / len(ds) for u, ds in zip(used, self.sources.datasets)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "samples_consumed": self.samples_consumed,
            "steps": self.steps,
            "global_batch": self.global_batch,
            "seed": self.sources.cfg.seed,
            "fingerprint": self.sources.fingerprint,
            "paths": list(self.sources.cfg.paths),
            "epochs": self.epochs(),  # informational
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from a saved position; refuses state made from other data or another seed."""
        try:
            version, consumed, steps = sd["version"], sd["samples_consumed"], sd["steps"]
            seed, fingerprint = sd["seed"], sd["fingerprint"]
        except (KeyError, TypeError) as exc:
            raise UserError(f"data loader state: missing key {exc} (not a megalm data state?)") from None
        if version != STATE_VERSION:
            raise UserError(f"data loader state: version {version}, this megalm reads {STATE_VERSION}")
        if seed != self.sources.cfg.seed:
            raise UserError(f"data.seed: the checkpoint was made with seed {seed}, the config says {self.sources.cfg.seed}")
        if fingerprint != self.sources.fingerprint:
            raise UserError(
                f"data.paths: the checkpoint's data (paths {sd.get('paths')}) differs from the config's "
                f"{self.sources.cfg.paths} in manifests, split, weights or seq_len; resuming would not continue "
                "the same sample sequence"
            )
        # position is in samples: a different global_batch continues from the same sample
        self.samples_consumed = int(consumed)
        self.steps = int(steps)


class EvalLoader(_TokenizerFacade):
    """Finite, deterministic micro batches over the eval split, source by source (documents in
    manifest order, no shuffling), so a blended run can measure each source and weigh them as
    training does. Every rank gets the same number of micro batches per source (the tail that does
    not fill micro_batch x dp_world samples is left out)."""

    def __init__(self, sources: Sources, micro_batch: int, dp_rank: int, dp_world: int, max_samples: int | None):
        _check_parallel(micro_batch * dp_world, micro_batch, dp_rank, dp_world)
        self.sources = sources
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        stride = micro_batch * dp_world
        # per-source cap keeps every source represented when eval is limited
        sizes = [len(ds) if max_samples is None else min(len(ds), max_samples) for ds in sources.datasets]
        self.source_batches_count = [n // stride for n in sizes]  # micro batches per rank, per source
        for m, n, nb in zip(sources.manifests, sizes, self.source_batches_count):
            if nb == 0:
                raise UserError(
                    f"{m.path}: splits.{sources.split}: {n} samples of seq_len {sources.cfg.seq_len}, too few to "
                    f"fill one eval micro batch ({micro_batch}) on each of {dp_world} ranks"
                )
        self.num_batches = sum(self.source_batches_count)

    @property
    def num_sources(self) -> int:
        return len(self.source_batches_count)

    def __len__(self) -> int:
        return self.num_batches

    def source_batches(self, k: int) -> Iterator[MicroBatch]:
        """This rank's micro batches of source k."""
        mb, w = self.micro_batch, self.dp_world
        for b in range(self.source_batches_count[k]):
            start = (b * w + self.dp_rank) * mb
            idx = np.arange(start, start + mb)
            yield self.sources.collate(self.sources.gather(np.full(mb, k), idx))

    def __iter__(self) -> Iterator[MicroBatch]:
        for k in range(self.num_sources):
            yield from self.source_batches(k)


def build_loader(cfg: DataConfig, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_world: int = 1,
                 kind: str = "text") -> TrainLoader:
    """Open `cfg.split` of every manifest (shards of `kind`: text or sft) and return this rank's
    training loader."""
    _check_parallel(global_batch, micro_batch, dp_rank, dp_world)
    return TrainLoader(Sources(cfg, cfg.split, kind=kind), global_batch, micro_batch, dp_rank, dp_world)


def build_eval_loader(
    cfg: DataConfig, micro_batch: int, dp_rank: int = 0, dp_world: int = 1, max_samples: int | None = None,
    kind: str = "text",
) -> EvalLoader:
    """Open `cfg.eval_split`; `max_samples` caps the samples taken from each source."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise UserError(f"max_samples: expected an integer >= 1 or None, got {max_samples!r}")
    return EvalLoader(Sources(cfg, cfg.eval_split, shuffle=False, kind=kind), micro_batch, dp_rank, dp_world,
                      max_samples)
