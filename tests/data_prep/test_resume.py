import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import tokenizer
from data_prep.config import PrepConfig
from data_prep.pipeline import PAUSE_ENV, run
from megalm.errors import UserError

from .conftest import run_prep, tree_digest

ARGS = ("--shard-size-mb", "0.005", "--valid-fraction", "0.05", "--dedup")


def _reference(tmp_path, corpus, model_path):
    ref = tmp_path / "ref"
    run(PrepConfig(inputs=(str(corpus),), output=str(ref), tokenizer=str(model_path),
                   shard_size_mb=0.005, valid_fraction=0.05, dedup=True))
    return tree_digest(ref)


def _ctrl_c_as_in_a_terminal() -> None:
    # A shell starts background jobs (`cmd &`, how CI may run the suite) with SIGINT ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt: give prep the disposition a user's
    # terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_paused(out, *args, shard: int = 1) -> subprocess.Popen:
    """`megalm prep` stopped by the pipeline's own hook right after publishing `shard`: it
    cannot finish before the test acts, however loaded the machine is."""
    cmd = [sys.executable, "-m", "megalm.cli", "prep", "-o", str(out), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, PAUSE_ENV: str(shard)}, preexec_fn=_ctrl_c_as_in_a_terminal)
    paused = out / ".units" / "paused"
    while not paused.exists():  # a state the run holds until signalled, not a deadline race
        if proc.poll() is not None:
            raise AssertionError(f"prep ended before pausing:\n{proc.stderr.read()}")
        time.sleep(0.01)
    assert not (out / "manifest.json").exists()
    return proc


def test_sigkill_then_resume_gives_identical_bytes(tmp_path, corpus, model_path):
    out = tmp_path / "out"
    proc = _start_paused(out, corpus, "--tokenizer", model_path, *ARGS)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / ".units").glob("shard-*.json")) == [
        "shard-00000.json", "shard-00001.json"]
    # Corrupt one finished shard: the resume must notice (checksum) and redo it.
    shard = out / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])

    resumed = run_prep(str(corpus), "-o", out, "--tokenizer", model_path, *ARGS)
    assert "work units (1 shard(s) reused)" in resumed.stdout, resumed.stdout
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
    proc = _start_paused(out, corpus, "--tokenizer", model_path, "--workers", "2", *ARGS)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], err
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob(".tmp-*")]
    resumed = run_prep(str(corpus), "-o", out, "--tokenizer", model_path, *ARGS)
    assert "(2 shard(s) reused)" in resumed.stdout, resumed.stdout
    assert tree_digest(out) == _reference(tmp_path, corpus, model_path)


def test_ctrl_c_landing_on_another_thread_still_stops(tmp_path, corpus, model_path):
    """A process-directed SIGINT may be delivered to any thread (Arrow's, the pool's): send it to
    one that is not the main thread, as the kernel may (with signal.pause() in the hook the
    paused run then never woke up)."""
    import ctypes

    out = tmp_path / "out"
    proc = _start_paused(out, corpus, "--tokenizer", model_path, "--workers", "2", *ARGS)
    others = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
    assert others, "the paused run has no thread besides the main one"
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_TGKILL = 234  # x86_64
    assert libc.syscall(SYS_TGKILL, proc.pid, others[-1], signal.SIGINT) == 0, ctypes.get_errno()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], err
    assert not (out / "manifest.json").exists()


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


def test_verify_checks_token_ids_against_the_tokenizer(tmp_path, corpus, model_path):
    import json

    out = tmp_path / "o"
    m = run(PrepConfig(inputs=(str(corpus),), output=str(out), tokenizer=str(model_path),
                       shard_size_mb=0.1, valid_fraction=0.05))
    first = m["splits"]["train"]["shards"][0]
    assert 0 < first["max_token_id"] < 500
    assert run_prep("--verify", out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100  # contradicts tokenizer.model and the shards
    manifest["splits"]["train"]["shards"][0]["max_token_id"] = first["max_token_id"] - 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = run_prep("--verify", out, check=False)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.splitlines()
    assert "manifest.json: tokenizer.vocab_size is 100 but tokenizer.model has 500 pieces" in lines
    assert f"{first['file']}: largest token id is {first['max_token_id']}, manifest " \
           f"max_token_id says {first['max_token_id'] - 1}" in lines
    assert any(ln.startswith(f"{first['file']}: max_token_id") and "outside the tokenizer's "
               "vocabulary (vocab_size 100)" in ln for ln in lines), lines
