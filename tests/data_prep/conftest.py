"""Shared fixtures: a small slice of the builtin corpus and a tokenizer trained once per session."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import tokenizer
from data_prep.builtin import iter_python_docs

N_DOCS = 2500  # the pydoc topics plus the first stdlib modules: ~0.9 MB of text


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return list(itertools.islice(iter_python_docs(), N_DOCS))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, docs) -> Path:
    """JSONL of `docs`, with a few exact duplicates appended to exercise --dedup."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in docs + docs[:7]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    return path


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, docs) -> Path:
    lines = [line for d in docs[:1500] for line in d.splitlines() if line.strip()]
    model = tokenizer.train(lines, tokenizer.TokenizerSpec(vocab_size=500))
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    path.write_bytes(model)
    return path


def run_prep(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """`megalm prep ARGS` as a real subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "prep", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"megalm prep failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (not the hidden bookkeeping)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}
