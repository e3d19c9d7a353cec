"""`megalm train` refuses shards whose recorded max token id the model cannot embed: exit 2,
one line naming the shard, before step 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

pytestmark = pytest.mark.timeout(600)


def test_train_exits_2_naming_the_shard_with_out_of_range_ids(tmp_path):
    from data_prep.builtin import write_python_docs_jsonl

    corpus = tmp_path / "docs.jsonl"
    write_python_docs_jsonl(corpus, max_bytes=400_000)
    shards = tmp_path / "shards"
    prep = subprocess.run([sys.executable, "-m", "megalm.cli", "prep", str(corpus), "-o", str(shards),
                           "--vocab-size", "300", "--shard-size-mb", "0.05"],
                          capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=300)
    assert prep.returncode == 0, prep.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    bad = manifest["splits"]["train"]["shards"][1]
    assert bad["max_token_id"] < vocab
    bad["max_token_id"] = vocab  # as if the shard held an id the tokenizer cannot make
    (shards / "manifest.json").write_text(json.dumps(manifest))

    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "train", str(REPO / "configs/demo.yaml"),
                           *small_overrides(str(shards), "range"), f"checkpoint.dir={tmp_path / 'ck'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=cpu_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert bad["file"] in errors[0] and f"token id {vocab}" in errors[0] and f"vocab_size is {vocab}" in errors[0]
    assert not list(tmp_path.rglob("step_*"))  # no step ran, nothing saved
