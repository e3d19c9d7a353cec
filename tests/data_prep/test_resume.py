import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import tokenizer
from data_prep.config import PrepConfig
from data_prep.pipeline import run
from megalm.errors import UserError

from .conftest import run_prep, tree_digest

ARGS = ("--shard-size-mb", "0.005", "--valid-fraction", "0.05", "--dedup")


def _reference(tmp_path, corpus, model_path):
    ref = tmp_path / "ref"
    run(PrepConfig(inputs=(str(corpus),), output=str(ref), tokenizer=str(model_path),
                   shard_size_mb=0.005, valid_fraction=0.05, dedup=True))
    return tree_digest(ref)


def test_sigkill_then_resume_gives_identical_bytes(tmp_path, corpus, model_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megalm.cli", "prep", str(corpus), "-o", str(out),
           "--tokenizer", str(model_path), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / ".units" / "unit-00000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert first.exists() and not (out / "manifest.json").exists(), "killed too late to test"
    done_before = len(list((out / ".units").glob("unit-*.json")))
    # Corrupt one finished shard: the resume must notice (checksum) and redo that unit.
    shard = out / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])

    resumed = run_prep(str(corpus), "-o", out, "--tokenizer", model_path, *ARGS)
    reused = int(resumed.stdout.split(" work units (")[1].split(" reused")[0])
    assert reused == done_before - 1
    assert tree_digest(out) == _reference(tmp_path, corpus, model_path)
    assert not [p for p in out.rglob(".tmp-*")]
    assert run_prep("--verify", out).returncode == 0


def test_rerun_of_finished_output_does_nothing(tmp_path, corpus, model_path):
    cfg = PrepConfig(inputs=(str(corpus),), output=str(tmp_path / "o"),
                     tokenizer=str(model_path), shard_size_mb=0.1)
    first = run(cfg)
    mtime = (tmp_path / "o" / "manifest.json").stat().st_mtime_ns
    assert run(cfg) == first
    assert (tmp_path / "o" / "manifest.json").stat().st_mtime_ns == mtime


def test_other_tokenizer_or_settings_refused_unless_overwrite(tmp_path, corpus, model_path,
                                                              docs):
    out = tmp_path / "o"
    base = dict(inputs=(str(corpus),), output=str(out), shard_size_mb=0.1)
    run(PrepConfig(**base, tokenizer=str(model_path)))
    other = tmp_path / "other.model"
    other.write_bytes(tokenizer.train([d for d in docs[:200] if d.strip()],
                                      tokenizer.TokenizerSpec(vocab_size=300)))
    with pytest.raises(UserError, match="holds shards of another tokenizer"):
        run(PrepConfig(**base, tokenizer=str(other)))
    with pytest.raises(UserError, match=r"other settings \(valid_fraction differ\)"):
        run(PrepConfig(**base, tokenizer=str(model_path), valid_fraction=0.2))
    m = run(PrepConfig(**base, tokenizer=str(other), overwrite=True))
    assert m["tokenizer"]["vocab_size"] == 300
    assert (out / "tokenizer.model").read_bytes() == other.read_bytes()
    names = {s["file"] for sp in m["splits"].values() for s in sp["shards"]}
    assert names == {p.name for p in out.glob("*.arrow")}


def test_verify_names_corrupt_and_truncated_shards(tmp_path, corpus, model_path):
    out = tmp_path / "o"
    m = run(PrepConfig(inputs=(str(corpus),), output=str(out), tokenizer=str(model_path),
                       shard_size_mb=0.1, valid_fraction=0.05))
    shards = m["splits"]["train"]["shards"]
    a, b = out / shards[0]["file"], out / shards[1]["file"]
    a.write_bytes(a.read_bytes()[: shards[0]["bytes"] // 2])  # truncated
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern inside the token values
    b.write_bytes(bytes(data))
    (out / m["splits"]["valid"]["shards"][0]["file"]).unlink()
    proc = run_prep("--verify", out, check=False)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith(f"{a.name}: size") for line in lines)
    assert any(line.startswith(f"{a.name}: not a readable Arrow") for line in lines)
    assert any(line.startswith(f"{b.name}: sha256") for line in lines)
    assert any(line.endswith(": missing") for line in lines)
    assert "Traceback" not in proc.stderr


def test_ctrl_c_stops_cleanly_then_resumes(tmp_path, corpus, model_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megalm.cli", "prep", str(corpus), "-o", str(out),
           "--tokenizer", str(model_path), "--workers", "2", *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = out / ".units" / "unit-00000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert not (out / "manifest.json").exists(), "interrupted too late to test"
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    run_prep(str(corpus), "-o", out, "--tokenizer", model_path, *ARGS)
    assert tree_digest(out) == _reference(tmp_path, corpus, model_path)


def test_verify_of_a_damaged_manifest_is_one_line_naming_the_key(tmp_path, corpus, model_path):
    import json

    out = tmp_path / "o"
    run(PrepConfig(inputs=(str(corpus),), output=str(out), tokenizer=str(model_path),
                   shard_size_mb=0.1, valid_fraction=0.05))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = run_prep("--verify", out, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "splits.train.shards[0].sha256" in lines[0], proc.stderr
