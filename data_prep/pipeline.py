"""`megalm prep` end to end: prepare the folder, stream units to workers/ranks, write the manifest.

Every rank reads the whole input (cheap next to tokenizing) so that unit boundaries, dedup and
the train/valid split are decided identically everywhere; rank r tokenizes units u with
u % world_size == r, each with its own pool of `workers` processes. Rank 0 writes the manifest
after gathering every rank's unit results.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from megalm.errors import UserError

from . import manifest, mpi, outdir, readers, tokenizer
from .config import PrepConfig
from megalm.fsio import atomic_write, fsync_dir
from .encoder import Encoder, EncoderPlan
from .units import Filter, Layout, Unit, encode_unit, finished, split_units, write_shard

_worker_state: dict = {}  # per worker process: its Encoder and settings (set by _init)
PAUSE_ENV = "MEGALM_PREP_PAUSE_AFTER_SHARD"


def _init(encoder: Encoder | tuple[bytes, EncoderPlan], min_tokens: int,
          valid_fraction: float) -> None:
    """`encoder`: the parent's own (forked workers inherit it, unpickled: no per-worker load
    and plan, ~50 ms of CPU each) or, when spawned, the model and plan to build one from."""
    # Ctrl-C reaches the whole process group: the parent stops the pool; workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if isinstance(encoder, tuple):
        encoder = Encoder(encoder[0], plan=encoder[1])
    _worker_state.update(encoder=encoder, min_tokens=min_tokens, valid_fraction=valid_fraction)


def _work(unit: Unit) -> dict:
    s = _worker_state
    return encode_unit(unit, s["encoder"], s["min_tokens"], s["valid_fraction"])


def _after_shard(out: Path, shard: int) -> None:
    """Test hook: with MEGALM_PREP_PAUSE_AFTER_SHARD=N, stop after publishing shard N, say so
    in `.units/paused`, and wait for a signal: an interrupt test then cannot race the run's
    end."""
    if os.environ.get(PAUSE_ENV) != str(shard):
        return
    atomic_write(out / outdir.UNITS_DIR / "paused", str(shard))
    # Not signal.pause(): a process-directed signal may land on another thread (Arrow's, the
    # pool's), which leaves the main thread in pause() for ever (reproduced with tgkill in
    # tests/data_prep/test_resume.py). Python runs the handler on the main thread after the next
    # short sleep returns.
    while True:
        time.sleep(0.05)


class _Progress:
    def __init__(self, rank: int):
        self.bar = tqdm(unit=" docs", disable=None if rank == 0 else True, dynamic_ncols=True,
                        desc="prep")
        self.t0, self.docs, self.tokens, self.chars = time.perf_counter(), 0, 0, 0

    def add(self, documents: int, tokens: int, chars: int) -> None:
        self.docs, self.tokens, self.chars = (self.docs + documents, self.tokens + tokens,
                                              self.chars + chars)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(documents)
        self.bar.set_postfix_str(f"{self.tokens / dt / 1e6:.2f}M tok/s "
                                 f"{self.chars / dt / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


class _ShardAssembler:
    """Takes unit results in input order; writes each shard once its last unit is in."""

    def __init__(self, out: Path, dtype: str, layout: Layout, progress: _Progress):
        self.out, self.dtype, self.layout, self.progress = out, dtype, layout, progress
        self.shard: int | None = None
        self.units: list[dict] = []
        self.results: list[dict] = []

    def add(self, unit: dict) -> None:
        shard = self.layout.shard_of(unit["unit"])
        if self.shard is not None and shard != self.shard:
            self.flush()
        self.shard = shard
        self.units.append(unit)
        self.progress.add(unit["documents_in"],
                          sum(int(p[1].sum()) for p in unit["parts"].values()),
                          unit["text_chars"])
        if self.layout.is_last_of_shard(unit["unit"]):
            self.flush()

    def flush(self) -> None:
        if self.shard is None:
            return
        self.results.append(write_shard(self.out, self.shard, self.units, self.dtype))
        shard, self.shard, self.units = self.shard, None, []
        _after_shard(self.out, shard)


def _start_pool(ctx, workers: int, initargs: tuple):
    """A pool whose forked workers leave the parent's objects alone: the cyclic GC of a worker
    would otherwise walk every object it inherited (a caller's whole heap: torch, earlier
    runs) at each full collection, costing CPU and copying the pages it touches (measured:
    ~20% of the workers' CPU on a 10 MB corpus). Frozen objects are skipped; the parent
    unfreezes its own at once, so nothing stays uncollectable there."""
    frozen = ctx.get_start_method() == "fork"
    if frozen:
        gc.freeze()
    try:
        return ctx.Pool(workers, _init, initargs)  # forks all workers before returning
    finally:
        if frozen:
            gc.unfreeze()


def _process_all(cfg: PrepConfig, sources: list[readers.Source], model: bytes, rank: int,
                 size: int) -> tuple[list[dict], int, int]:
    """This rank's shard results, the bad-line count, and how many shards were already done.

    Shards go to ranks round-robin; within a rank, work units go to `workers` processes and
    come back in input order."""
    out = Path(cfg.output)
    dtype = tokenizer.token_dtype(spm.SentencePieceProcessor(model_proto=model).get_piece_size())
    layout = Layout.for_shards(cfg.shard_size_mb, np.dtype(dtype).itemsize)
    counters = readers.ReadCounters()
    docs = readers.iter_documents(sources, cfg.text_key, cfg.skip_bad, counters,
                                  cfg.max_document_chars)
    filt = Filter(cfg.min_chars, cfg.dedup)
    reused: list[dict] = []
    pool = None
    pending: deque = deque()
    spawn = size > 1 or mpi.launched_under_mpi()
    encoder = None if cfg.workers > 1 and spawn else Encoder(model)
    if cfg.workers > 1:
        # Fork is cheap; it happens before this pass starts readers or tqdm, and the workers use
        # only sentencepiece, numpy and Arrow compute (Arrow re-creates its thread pools after
        # a fork). Under MPI spawn instead: forking an initialised MPI process is not supported.
        ctx = mp.get_context("spawn" if spawn else "fork")
        made = encoder if encoder is not None else (model, EncoderPlan.of(model))
        pool = _start_pool(ctx, cfg.workers, (made, cfg.min_tokens, cfg.valid_fraction))
    progress = _Progress(rank)
    shards = _ShardAssembler(out, dtype, layout, progress)
    skipping = None  # a finished shard of an earlier attempt whose units are not redone
    try:
        for index, raw in split_units(docs, layout.chars_per_unit):
            shard = layout.shard_of(index)
            owned = shard % size == rank
            if owned and index % layout.units_per_shard == 0:
                done = finished(out, shard)
                if done is not None:
                    reused.append(done)
                    progress.add(done["documents_in"], sum(f["tokens"] for f in done["shards"]),
                                 done["text_chars"])
                skipping = shard if done is not None else None
            unit = filt.apply(index, raw, owned and shard != skipping)
            if not owned or shard == skipping:
                continue
            if pool is None:
                assert encoder is not None
                shards.add(encode_unit(unit, encoder, cfg.min_tokens, cfg.valid_fraction))
                continue
            # Bound memory: at most 2 units per worker in flight.
            while len(pending) >= 2 * cfg.workers:
                shards.add(pending.popleft().get())
            pending.append(pool.apply_async(_work, (unit,)))
        if pool is not None:
            pool.close()  # workers exit as they finish: the join below does not wait for them
        while pending:
            shards.add(pending.popleft().get())
        shards.flush()
    finally:
        progress.close()
        if pool is not None:
            pool.terminate() if pending else pool.close()
            pool.join()
    results = sorted(reused + shards.results, key=lambda r: r["shard"])
    return results, counters.bad_lines, len(reused)


def run(cfg: PrepConfig) -> dict:
    """Run `megalm prep`; returns the manifest (on every rank)."""
    cfg.validate()
    comm = mpi.world()
    sources = readers.resolve(list(cfg.inputs))
    setup: tuple | str
    if comm.rank == 0:
        try:
            setup = outdir.prepare(cfg, sources)
        except UserError as exc:
            setup = str(exc)
    setup = comm.bcast(setup if comm.rank == 0 else None)
    if isinstance(setup, str):
        _fail(setup, comm.rank)
    model, already_done = setup
    out = Path(cfg.output)
    if already_done:
        result = manifest.load(out)
        if comm.rank == 0:
            print(f"{out}: already complete and verified, nothing to do")
            _print_summary(result, reused=None)
        return result

    try:
        payload = (*_process_all(cfg, sources, model, comm.rank, comm.size), None)
    except UserError as exc:
        payload = (None, 0, 0, str(exc))
    except OSError as exc:  # the output folder became unwritable (permissions, disk full)
        payload = (None, 0, 0, str(outdir.output_error(out, exc)))
    gathered = comm.gather(payload)
    final: dict | str
    if comm.rank == 0:
        final = _finish(cfg, out, model, gathered)
    final = comm.bcast(final if comm.rank == 0 else None)
    if isinstance(final, str):
        _fail(final, comm.rank)
    return final


def _fail(message: str, rank: int) -> None:
    """Rank 0 reports the error; other ranks exit quietly so the user sees it once."""
    if rank == 0:
        raise UserError(message)
    raise SystemExit(2)


def _finish(cfg: PrepConfig, out: Path, model: bytes, gathered: list) -> dict | str:
    errors = [p[3] for p in gathered if p[3]]
    if errors:
        return errors[0]
    results = sorted((r for p in gathered for r in p[0]), key=lambda r: r["shard"])
    bad_lines = gathered[0][1]  # every rank reads everything, so rank 0's count is the total
    reused = sum(p[2] for p in gathered)
    if [r["shard"] for r in results] != list(range(len(results))):
        return f"{out}: internal error: shards missing from the gathered results"
    tok = tokenizer.describe(model)
    m = manifest.build(results, tok, tokenizer.token_dtype(tok["vocab_size"]), bad_lines)
    if m["stats"]["documents_in"] == 0:
        return f"inputs {' '.join(cfg.inputs)}: no documents found (empty input)"
    if m["stats"]["documents"] == 0:
        return (f"inputs {' '.join(cfg.inputs)}: every document was removed by the filters "
                f"({m['stats']['removed']}); relax --min-chars/--min-tokens")
    fsync_dir(out / outdir.UNITS_DIR)
    fsync_dir(out)  # every shard rename is durable before the manifest points at it
    manifest.write(out, m)
    _print_summary(m, reused)
    print(f"parallel: {len(gathered)} rank(s) x {cfg.workers} worker(s); wrote {out}/manifest.json")
    return m


def _print_summary(m: dict, reused: int | None) -> None:
    """`reused`: shards kept from an earlier attempt (None: all of them)."""
    s, sp = m["stats"], m["splits"]
    removed = ", ".join(f"{k} {v:,}" for k, v in s["removed"].items())
    pct = s["tokens_per_document"]
    print(f"documents: {s['documents_in']:,} read, {s['documents']:,} kept "
          f"(train {sp['train']['documents']:,}, valid {sp['valid']['documents']:,})\n"
          f"tokens: {s['tokens']:,} (train {sp['train']['tokens']:,}, "
          f"valid {sp['valid']['tokens']:,}), {m['dtype']}\n"
          f"shards: {s['shards']} files from {s['work_units']} work units "
          f"({'all' if reused is None else reused} shard(s) reused)\n"
          f"tokens per document: p50 {pct['p50']:,}, p90 {pct['p90']:,}, p99 {pct['p99']:,}\n"
          f"removed: {removed}")
