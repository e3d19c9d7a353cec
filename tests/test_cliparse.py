"""Every verb takes its options anywhere among its positionals (megalm/cliparse.py).

Each case puts an option between positionals (or before the first) and checks an outcome that
only a correct parse reaches: the error names what the *later* validation found (a config key, a
missing input), not `unrecognized arguments`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megalm import CONFIGS_DIR
from megalm.cli import main as megalm_main
from tests.distributed.helper import REPO, cpu_env

DEMO = str(CONFIGS_DIR / "demo.yaml")


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = megalm_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv", [
    ["train", "demo", "--resume", "none", "batch.micro_batch=0"],
    ["train", "--resume", "none", "demo", "train.steps=3", "batch.micro_batch=0"],
    ["train", "demo", "train.steps=3", "--resume=none", "batch.micro_batch=0"],
])
def test_train(capsys, argv):
    rc, _, err = run(capsys, argv)
    assert rc == 2 and err == "error: demo.yaml: batch.micro_batch: expected a positive number, got 0\n", err


def test_train_bad_option_is_one_line(capsys):
    rc, _, err = run(capsys, ["train", "demo", "--restart", "none", "train.steps=3"])
    assert rc == 2 and err == ("error: megalm train: unrecognized arguments: --restart none train.steps=3 "
                               "(see megalm train --help)\n"), err


def test_plan(capsys):
    rows = []
    for argv in (["plan", "gpt2-124m", "--gpus", "8", "data.seq_len=2048", "--json"],
                 ["plan", "--json", "gpt2-124m", "data.seq_len=2048", "--gpus", "8"],
                 ["plan", "gpt2-124m", "--gpus", "8", "--json"]):
        rc, out, err = run(capsys, argv)
        assert rc == 0, err
        rows.append(json.loads(out)["rows"])
    assert rows[0] == rows[1] != rows[2]  # the override after --gpus took effect


def test_submit(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, ["submit", DEMO, "--nodes", "1", "train.steps=7", "--gpus-per-node", "0",
                                "--time", "10", "--dry-run", "checkpoint.interval=7"])
    assert rc == 0, err
    assert f"megalm.cli train {DEMO} train.steps=7 checkpoint.interval=7 --resume auto" in out, out


def test_sample_and_export_and_import(capsys, tmp_path):
    missing = str(tmp_path / "nock")
    for argv in (["sample", "--prompt", "x", missing, "--temperature", "0"],
                 ["export", "--format", "hf", missing, "--out", str(tmp_path / "o")]):
        rc, _, err = run(capsys, argv)
        assert rc == 2 and err.startswith(f"error: {missing}: no such checkpoint"), err
    rc, _, err = run(capsys, ["import-hf", "--out", str(tmp_path / "o"), missing])
    assert rc == 2 and err.startswith(f"error: {missing}/config.json: cannot read"), err


def test_prep_text_sft_images(capsys, tmp_path):
    have = tmp_path / "a.jsonl"
    have.write_text('{"text": "hello"}\n')
    missing = tmp_path / "b.jsonl"
    rc, _, err = run(capsys, ["prep", str(have), "-o", str(tmp_path / "out"), str(missing), "--vocab-size", "300"])
    assert rc == 2 and err.startswith(f"error: input {missing}: no such file"), err
    # --sft: the inputs around -o were both taken; the tokenizer is checked next.
    rc, _, err = run(capsys, ["prep", str(have), "--sft", "-o", str(tmp_path / "o2"), str(have),
                              "--tokenizer", str(tmp_path / "none.model")])
    assert rc == 2 and err.startswith(f"error: --tokenizer {tmp_path / 'none.model'}: cannot read"), err
    rc, _, err = run(capsys, ["prep", "--images", "--channels", "1", str(tmp_path / "d.npz"), "-o",
                              str(tmp_path / "o3"), "--valid-fraction", "0.1"])
    assert rc == 2 and str(tmp_path / "d.npz") in err and "unrecognized" not in err, err


def test_launch_options_after_the_separator_belong_to_the_command():
    # launch has no positionals of its own: everything after `--` is the command, untouched.
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "launch", "--master-addr", "127.0.0.1", "--nproc", "1",
                           "--", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--nproc", "3"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("['--nproc', '3']"), proc.stdout


def test_ops_build_options_are_checked_in_any_order(capsys):
    rc, _, err = run(capsys, ["ops", "build", "-v", "--arch", "sm_80"])
    assert rc == 2 and "--arch" in err and "sm_80" in err and err.count("\n") == 1, err
