"""benchmarks/train_gpu.py runs only on a GPU for its figures; `--smoke` runs every path of the
harness on this CPU (megalm's row through the trainer, the nanoGPT-style baseline, the summary and
the speedup keys) so a GPU session spends its minutes measuring, not debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = tmp_path_factory.mktemp("bench")
    make_corpus(str(data / "shards"))
    out = data / "train_gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_gpu.py"), "--smoke", "--data",
                           str(data), "--out", str(out)], env=cpu_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, json.loads(out.read_text())


def test_rows_and_keys(smoke):
    _, doc = smoke
    suite = doc["gpt2_124m"]
    rows = suite["rows"]
    assert set(rows) == {"megalm_zero1", "nanogpt_eager"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0
    tokens = suite["micro_batch"] * suite["grad_accum"] * suite["seq_len"]
    assert rows["megalm_zero1"]["tokens_per_s"] == pytest.approx(tokens / rows["megalm_zero1"]["step_s"], rel=1e-3)
    ratio = rows["megalm_zero1"]["tokens_per_s"] / rows["nanogpt_eager"]["tokens_per_s"]
    assert suite["speedup_vs_nanogpt_eager"] == pytest.approx(ratio, rel=1e-2)
    assert suite["flops_per_token"] > 0 and doc["smoke"] is True and doc["device"] == "cpu"


def test_baseline_tokens_are_the_prepared_train_split(smoke):
    import pyarrow as pa

    data, _ = smoke
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    docs = [d for f in sorted((data / "shards").glob("train-*.arrow"))
            for d in pa.ipc.open_file(str(f)).read_all().column("tokens").to_pylist()]
    flat = np.fromfile(data / "train-tokens.u16", dtype=np.uint16)
    assert len(flat) == sum(len(d) + 1 for d in docs)
    assert flat[len(docs[0])] == manifest["tokenizer"]["eos_id"] and list(flat[:len(docs[0])]) == docs[0]
