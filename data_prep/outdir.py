"""The output folder before work starts: refuse foreign content, resume ours, fix the tokenizer.

`.prep-state.json` records the settings that determine the output and the tokenizer's sha256;
a re-run with the same settings resumes, different settings are refused unless --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from megalm.errors import UserError

from . import manifest, readers, tokenizer
from .config import PrepConfig
from megalm.fsio import atomic_write, sha256_file

from .shards import remove_temp_files

STATE = ".prep-state.json"
UNITS_DIR = ".units"
_OURS = re.compile(r"^(train|valid)-\d{5,}\.arrow$")


def output_error(out: Path, exc: OSError) -> UserError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return UserError(f"--output {out}: cannot create or write{where}: "
                     f"{exc.strerror or exc}; expected a writable directory")


def _overwrite(out: Path) -> None:
    for p in out.iterdir():
        if p.name in (manifest.MANIFEST, manifest.TOKENIZER_FILE, STATE) or _OURS.match(p.name):
            p.unlink()
    units = out / UNITS_DIR
    if units.is_dir():
        for p in units.iterdir():
            p.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _sample_lines(cfg: PrepConfig, sources: list[readers.Source]) -> Iterator[str]:
    """Non-empty lines of documents picked by hash at a rate that yields ~sample_mb of text."""
    # Compressed sources hold roughly 4x their size in text; the builtin corpus ~5 MB.
    est = sum(s.size * (4 if s.path.endswith((".gz", ".zst", ".parquet")) else 1)
              if s.kind != "builtin" else 5 << 20 for s in sources)
    budget = int(cfg.tokenizer_sample_mb * (1 << 20))
    threshold = min(1.0, budget / max(est, 1)) * 2**64
    taken = 0
    for text in readers.iter_documents(sources, cfg.text_key, cfg.skip_bad,
                                       max_chars=cfg.max_document_chars):
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        if h >= threshold:
            continue
        for line in text.splitlines():
            if line.strip():
                yield line
                taken += len(line) + 1
        if taken >= budget:
            return


def _train(cfg: PrepConfig, sources: list[readers.Source]) -> bytes:
    lines = _sample_lines(cfg, sources)
    first = next(lines, None)
    if first is None:
        raise UserError(f"inputs {' '.join(cfg.inputs)}: no text found (empty input)")
    model = tokenizer.train(_prepend(first, lines), cfg.tokenizer_spec)
    asked, got = cfg.tokenizer_spec.vocab_size, tokenizer.describe(model)["vocab_size"]
    if got < asked:
        message = (f"--vocab-size {asked}: the tokenizer sample yields only {got:,} pieces "
                   f"(too little or too repetitive text); ask for at most {got} or give more "
                   "text (--tokenizer-sample-mb)")
        if cfg.strict_vocab:
            raise UserError(message)
        print(f"warning: {message}; continuing with {got:,} (--strict-vocab refuses)",
              file=sys.stderr)
    return model


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def prepare(cfg: PrepConfig, sources: list[readers.Source]) -> tuple[bytes, bool]:
    """Rank 0 only. Returns (tokenizer model bytes, whether a finished manifest already matches)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / UNITS_DIR).mkdir(exist_ok=True)
        remove_temp_files(out)
        probe = out / UNITS_DIR / ".write-test"
        probe.write_bytes(b"")  # fail now, not after tokenizer training
        probe.unlink()
    except OSError as exc:
        raise output_error(out, exc) from None
    settings = cfg.output_settings()
    state = _read_json(out / STATE)
    old_manifest = _read_json(out / manifest.MANIFEST)
    tok_copy = out / manifest.TOKENIZER_FILE

    if cfg.tokenizer is not None:
        model = tokenizer.load_bytes(cfg.tokenizer)
    elif (not cfg.overwrite and state and state.get("settings") == settings and tok_copy.is_file()
          and sha256_file(tok_copy) == state.get("tokenizer_sha256")):
        model = tok_copy.read_bytes()  # resuming: the tokenizer trained by the first attempt
    else:
        model = _train(cfg, sources)
    sha = hashlib.sha256(model).hexdigest()

    if not cfg.overwrite:
        if old_manifest is not None:
            old_sha = (old_manifest.get("tokenizer") or {}).get("sha256", "?")
            if old_sha != sha:
                raise UserError(f"{out / manifest.MANIFEST}: holds shards of another tokenizer "
                                f"(sha256 {old_sha[:12]}…, this run: {sha[:12]}…); use "
                                "--overwrite to replace them or choose another --output")
        if state is not None:
            old = {**state.get("settings", {}), "tokenizer_sha256": state.get("tokenizer_sha256")}
            new = {**settings, "tokenizer_sha256": sha}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise UserError(f"{out / STATE}: this folder holds a run with other settings "
                                f"({', '.join(diff)} differ); use --overwrite or another --output")
        elif old_manifest is not None or any(_OURS.match(p.name) for p in out.iterdir()):
            raise UserError(f"--output {out}: holds shards of an unknown run; use --overwrite")
    else:
        _overwrite(out)

    if not tok_copy.is_file() or tok_copy.read_bytes() != model:
        atomic_write(tok_copy, model)
    atomic_write(out / STATE, json.dumps({"settings": settings, "tokenizer_sha256": sha},
                                         indent=2, sort_keys=True).encode())
    done = old_manifest is not None and not cfg.overwrite and not manifest.verify(out)
    return model, done
