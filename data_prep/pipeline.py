"""`megalm prep` end to end: prepare the folder, stream units to workers/ranks, write the manifest.

Every rank reads the whole input (cheap next to tokenizing) so that unit boundaries, dedup and
the train/valid split are decided identically everywhere; rank r tokenizes units u with
u % world_size == r, each with its own pool of `workers` processes. Rank 0 writes the manifest
after gathering every rank's unit results.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megalm.errors import UserError

from . import manifest, mpi, outdir, readers, tokenizer
from .config import PrepConfig
from megalm.fsio import fsync_dir
from .units import Encoder, Filter, Unit, finished, process, split_units, unit_chars

_worker_state: dict = {}  # per worker process: its Encoder and output folder (set by _init)


def _init(model: bytes, out: str, min_tokens: int, valid_fraction: float) -> None:
    _worker_state.update(encoder=Encoder(model), out=Path(out), min_tokens=min_tokens,
                         valid_fraction=valid_fraction)


def _work(unit: Unit) -> dict:
    s = _worker_state
    return process(unit, s["encoder"], s["out"], s["min_tokens"], s["valid_fraction"])


class _Progress:
    def __init__(self, rank: int):
        self.bar = tqdm(unit=" docs", disable=None if rank == 0 else True, dynamic_ncols=True,
                        desc="prep")
        self.t0, self.docs, self.tokens, self.chars = time.perf_counter(), 0, 0, 0

    def add(self, result: dict) -> None:
        n = result["documents_in"]
        self.docs += n
        self.tokens += sum(s["tokens"] for s in result["shards"])
        self.chars += result.get("text_chars", 0)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(n)
        self.bar.set_postfix_str(f"{self.tokens / dt / 1e6:.2f}M tok/s "
                                 f"{self.chars / dt / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _process_all(cfg: PrepConfig, sources: list[readers.Source], model: bytes, rank: int,
                 size: int) -> tuple[list[dict], int, int]:
    """This rank's unit results, the bad-line count, and how many units were already done."""
    out = Path(cfg.output)
    dtype_bytes = np.dtype(tokenizer.token_dtype(tokenizer.describe(model)["vocab_size"])).itemsize
    counters = readers.ReadCounters()
    docs = readers.iter_documents(sources, cfg.text_key, cfg.skip_bad, counters)
    filt = Filter(cfg.min_chars, cfg.dedup)
    results, reused = [], 0
    pool = None
    encoder = None
    pending: deque = deque()
    if cfg.workers > 1:
        # Fork is cheap; it happens before this pass starts readers or tqdm, and the workers use
        # only sentencepiece, numpy and Arrow's single-threaded IPC writer (Arrow re-creates
        # its thread pools after a fork anyway). Under MPI spawn instead: forking an
        # initialised MPI process is not supported.
        ctx = mp.get_context("spawn" if size > 1 or mpi.launched_under_mpi() else "fork")
        pool = ctx.Pool(cfg.workers, _init,
                        (model, str(out), cfg.min_tokens, cfg.valid_fraction))
    else:
        encoder = Encoder(model)
    progress = _Progress(rank)
    try:
        for index, raw in split_units(docs, unit_chars(cfg.shard_size_mb, dtype_bytes)):
            owned = index % size == rank
            unit = filt.apply(index, raw, owned)
            if not owned:
                continue
            done = finished(out, index)
            if done is not None:
                reused += 1
                results.append(done)
                progress.add(done)
            elif pool is None:
                results.append(process(unit, encoder, out, cfg.min_tokens, cfg.valid_fraction))
                progress.add(results[-1])
            else:
                # Bound memory: at most workers+1 units in flight.
                while len(pending) > cfg.workers:
                    results.append(pending.popleft().get())
                    progress.add(results[-1])
                pending.append(pool.apply_async(_work, (unit,)))
        while pending:
            results.append(pending.popleft().get())
            progress.add(results[-1])
    finally:
        progress.close()
        if pool is not None:
            pool.terminate() if pending else pool.close()
            pool.join()
    return results, counters.bad_lines, reused


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
            _print_summary(result, reused=result["stats"]["work_units"])
        return result

    try:
        payload = (*_process_all(cfg, sources, model, comm.rank, comm.size), None)
    except UserError as exc:
        payload = (None, 0, 0, str(exc))
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
    results = sorted((r for p in gathered for r in p[0]), key=lambda r: r["unit"])
    bad_lines = gathered[0][1]  # every rank reads everything, so rank 0's count is the total
    reused = sum(p[2] for p in gathered)
    if [r["unit"] for r in results] != list(range(len(results))):
        return f"{out}: internal error: work units missing from the gathered results"
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


def _print_summary(m: dict, reused: int) -> None:
    s, sp = m["stats"], m["splits"]
    removed = ", ".join(f"{k} {v:,}" for k, v in s["removed"].items())
    pct = s["tokens_per_document"]
    print(f"documents: {s['documents_in']:,} read, {s['documents']:,} kept "
          f"(train {sp['train']['documents']:,}, valid {sp['valid']['documents']:,})\n"
          f"tokens: {s['tokens']:,} (train {sp['train']['tokens']:,}, "
          f"valid {sp['valid']['tokens']:,}), {m['dtype']}\n"
          f"shards: {s['shards']} from {s['work_units']} work units ({reused} reused)\n"
          f"tokens per document: p50 {pct['p50']:,}, p90 {pct['p90']:,}, p99 {pct['p99']:,}\n"
          f"removed: {removed}")
