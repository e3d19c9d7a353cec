"""Review fixes around the trainer, on one real rank plus in-process unit checks:
save before the final eval, eval split validated at init, checkpoint dirs never mixing runs,
`megalm sample` after the shard directory moved, data.verify, fused pipeline loss, TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megalm.errors import UserError
from megalm.train.config import load_config
from megalm.train.task import LMTask
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env, run_distributed
from tests.distributed.jobs import small_overrides

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))


def _copy(shards: str, dest) -> str:
    shutil.copytree(shards, dest)
    return str(dest)


@pytest.fixture(scope="module")
def job(shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("checks")
    own = _copy(shards, base / "own-shards")  # moved away later: sample must not need it
    no_valid = _copy(shards, base / "no-valid")
    manifest = json.loads((base / "no-valid" / "manifest.json").read_text())
    manifest["splits"]["valid"] = {"documents": 0, "tokens": 0, "shards": []}
    (base / "no-valid" / "manifest.json").write_text(json.dumps(manifest))
    work = base / "work"
    work.mkdir()
    result = run_distributed("tests.distributed.jobs:trainer_checks",
                             {"workdir": str(work), "shards": own, "no_valid_shards": no_valid}, nproc=1)[0]
    return {"work": work, "own": own, "base": base, **result}


def test_final_save_happens_before_final_eval(job):
    assert job["evalfail"] == "eval failed"
    assert job["evalfail_tags"] == ["step_00000003"]


def test_impossible_eval_split_fails_at_init(job):
    r = job["bad_eval"]
    assert not r["ok"] and "\n" not in r["error"] and "valid" in r["error"]
    assert job["bad_eval_stage"] == [] and job["bad_eval_tags"] == []


def test_checkpoint_dirs_never_mix_runs(job):
    assert job["ck_tags"] == ["step_00000001", "step_00000002"]
    none = job["resume_none"]
    assert not none["ok"] and "--resume auto" in none["error"] and "runs/ck/checkpoints" in none["error"]
    older = job["resume_older"]
    assert not older["ok"] and "newer checkpoints" in older["error"] and "step_00000002" in older["error"]
    assert job["resume_newest"] == {"ok": True, "result": 2}
    foreign = job["resume_foreign"]  # another run's checkpoint into a dir holding this run's
    assert not foreign["ok"] and "would mix two runs" in foreign["error"]


def test_fp16_on_cpu_is_refused(job):
    r = job["fp16_cpu"]
    assert not r["ok"] and "precision.dtype: fp16 needs a GPU" in r["error"]


def test_summary_written_atomically(job):
    assert [os.path.basename(p) for p in job["summary_writes"]] == ["summary.json"]
    assert json.loads((job["work"] / "runs" / "ck" / "summary.json").read_text())["step"] == 2


def test_sample_after_shard_dir_moved(job):
    root = str(job["work"] / "runs" / "ck" / "checkpoints")
    os.rename(job["own"], job["own"] + "-moved")
    try:
        proc = subprocess.run([sys.executable, "-m", "megalm.cli", "sample", root, "--prompt", "The list",
                               "--max-new-tokens", "4", "--temperature", "0"],
                              capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=300)
    finally:
        os.rename(job["own"] + "-moved", job["own"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("The list")


def test_sample_tokenizer_fallback_is_sha256_checked(shards, tmp_path):
    import hashlib

    from megalm.models.load import load_tokenizer

    good = open(os.path.join(shards, "tokenizer.model"), "rb").read()
    sha = hashlib.sha256(good).hexdigest()
    gone = str(tmp_path / "gone" / "tokenizer.model")
    changed = tmp_path / "tokenizer.model"
    changed.write_bytes(b"another tokenizer")
    for path in (gone, str(changed)):  # moved away, or replaced by a different file
        meta = {"data": {"tokenizer_path": path, "tokenizer_sha256": sha, "tokenizer_model": good}}
        assert load_tokenizer(meta).vocab_size() == 320
        meta["data"]["tokenizer_model"] = b"corrupted copy"
        with pytest.raises(UserError, match="fails its sha256 check"):
            load_tokenizer(meta)
        meta["data"].pop("tokenizer_model")
        with pytest.raises(UserError, match="stores no copy"):
            load_tokenizer(meta)


def _cfg(shards: str, *extra: str):
    return load_config(None, small_overrides(shards, "unit") + list(extra))


def test_pipeline_stages_beyond_model_layers(shards):
    LMTask(_cfg(shards, "parallel.pipeline_stages=4"))  # embedding + 2 blocks + head
    with pytest.raises(UserError, match=r"parallel\.pipeline_stages: 5 stages for a model of 4 pipeline layers"):
        LMTask(_cfg(shards, "parallel.pipeline_stages=5"))


def test_pipeline_head_uses_fused_loss(shards):
    import torch

    task = LMTask(_cfg(shards))
    model = task.build_model()
    head = task.pipeline_layers(model)[-1]
    assert head.fused_loss
    out = head((torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.long)))
    assert out.shape == (2, 5, 32)  # hidden states, not [B, T, V] logits


def test_data_verify_catches_same_size_corruption(shards, tmp_path):
    copy = _copy(shards, tmp_path / "shards")
    manifest = json.loads(open(os.path.join(copy, "manifest.json")).read())
    shard = os.path.join(copy, manifest["splits"]["train"]["shards"][0]["file"])
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
    LMTask(_cfg(copy)).build_loader("train", 0, 1)  # not verified: opens
    task = LMTask(_cfg(copy, "data.verify=true"))
    with pytest.raises(UserError, match="sha256"):
        task.build_loader("train", 0, 1)


def test_missing_tensorboard_is_an_error(tmp_path, monkeypatch):
    from megalm.train.metrics import Metrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError):
        Metrics(str(tmp_path), str(tmp_path / "tb"), 10, 0, enabled=True, progress=False)
