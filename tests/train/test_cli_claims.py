"""The README's training claims, each through `megalm launch -- megalm train` on 2 real CPU ranks
(gloo + DeepSpeed's CPU accelerator): bf16, activation checkpointing, blended data with periodic
eval (blended and per source), the log line, SIGUSR1 and Ctrl-C (checkpoint at the end of the
step, exit 128+signum), a second Ctrl-C aborting, strict-JSON summary, and at most one host
synchronisation per optimizer step. Signals are sent at an exact step through the trainer's
debug.wait_at_step hook (each rank announces itself and blocks until signalled): no sleeps."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.corpus import make_blend_corpus
from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

pytestmark = pytest.mark.timeout(900)
STEPS = 8
START_CAP_S = 400  # first DeepSpeed start on a loaded 2-core box may JIT-build its comm op


def _strict(text: str):
    def no_nan(token: str):
        raise AssertionError(f"non-JSON constant {token}")
    return json.loads(text, parse_constant=no_nan)


class Run:
    """One `megalm launch --nproc 2 -- megalm train` with stdout/stderr in files."""

    def __init__(self, work: Path, label: str, extra: list[str]):
        self.work, self.label = work, label
        self.out = work / f"probe-{label}"
        self.out.mkdir()
        self.stdout, self.stderr = work / f"{label}.out", work / f"{label}.err"
        shards = make_blend_corpus(str(work.parent / "corpus"))
        overrides = small_overrides(shards[0], "claims", steps=STEPS)
        overrides += [f"data.paths=[{shards[0]},{shards[1]}]", "data.weights=[3,1]", "precision.dtype=bf16",
                      "parallel.zero_stage=1", "parallel.activation_checkpointing=true", "eval.interval=2",
                      "eval.batches=2", "checkpoint.interval=100", "logging.interval=2", *extra]
        cmd = [sys.executable, "-m", "megalm.cli", "launch", "--nproc", "2", "--", sys.executable, "-m",
               "tests.train.probe", str(self.out), "train", str(work / "run.yaml"), *overrides]
        with open(self.stdout, "w") as o, open(self.stderr, "w") as e:
            self.proc = subprocess.Popen(cmd, cwd=work, env=cpu_env(), stdout=o, stderr=e)

    def wait_marker(self, step: int) -> None:
        markers = [self.work / "runs" / "claims" / f"waiting-step{step}.rank{r}" for r in range(2)]
        deadline = time.monotonic() + START_CAP_S
        while not all(m.exists() for m in markers):
            assert self.proc.poll() is None, f"{self.label} exited {self.proc.returncode}: {self.err()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.label}: ranks never reached step {step}"
            time.sleep(0.05)

    def rank_pids(self, step: int) -> list[int]:
        return [int((self.work / "runs" / "claims" / f"waiting-step{step}.rank{r}").read_text()) for r in range(2)]

    def wait_stderr(self, text: str) -> None:
        deadline = time.monotonic() + 120
        while text not in self.err():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err()[-3000:]
            time.sleep(0.05)

    def finish(self) -> int:
        return self.proc.wait(timeout=600)

    def err(self) -> str:
        return self.stderr.read_text()

    def probes(self) -> list[dict]:
        return [json.loads((self.out / f"probe.rank{r}.json").read_text()) for r in range(2)]


def _tags(work: Path) -> list[str]:
    ck = work / "runs" / "claims" / "checkpoints"
    return sorted(p.name for p in ck.glob("step_*") if (p / "COMPLETE").exists()) if ck.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("claims") / "work"
    work.mkdir()
    (work / "run.yaml").write_text("name: claims\n")
    out = {"work": work}

    usr1 = Run(work, "usr1", ["debug.wait_at_step=3"])
    usr1.wait_marker(3)
    usr1.proc.send_signal(signal.SIGUSR1)  # to the launcher, which forwards it
    out["usr1"] = (usr1, usr1.finish(), _tags(work))

    ctrlc = Run(work, "ctrlc", ["debug.wait_at_step=5"])
    ctrlc.wait_marker(5)
    for pid in ctrlc.rank_pids(5):  # to the ranks themselves (as under torchrun or srun)
        os.kill(pid, signal.SIGINT)
    out["ctrlc"] = (ctrlc, ctrlc.finish(), _tags(work))

    abort = Run(work, "abort", ["debug.wait_at_step=7", "debug.wait_for_signals=2"])
    abort.wait_marker(7)
    abort.proc.send_signal(signal.SIGINT)
    abort.wait_stderr("press Ctrl-C again to abort")
    abort.proc.send_signal(signal.SIGINT)
    out["abort"] = (abort, abort.finish(), _tags(work))

    final = Run(work, "final", [])
    out["final"] = (final, final.finish(), _tags(work))
    return out


def test_sigusr1_checkpoints_at_the_step_and_exits_128_plus_signum(runs):
    run, code, tags = runs["usr1"]
    assert code == 128 + signal.SIGUSR1, run.err()[-3000:]
    assert tags == ["step_00000003"]
    summary = _strict(run.stdout.read_text().strip().splitlines()[-1])  # rank 0 prints it last
    assert summary["stopped_by_signal"] == signal.SIGUSR1 and summary["step"] == 3
    assert all(p["steps"] == 3 for p in run.probes())


def test_first_ctrl_c_to_the_ranks_checkpoints_and_says_so(runs):
    run, code, tags = runs["ctrlc"]
    assert code == 128 + signal.SIGINT, run.err()[-3000:]
    assert tags == ["step_00000003", "step_00000005"]
    err = run.err()
    assert err.count("press Ctrl-C again to abort at once") == 1  # rank 0 says it once
    assert "checkpointing at step 5 and stopping" in err
    assert "Traceback" not in err and "stopping the other ranks" not in err  # a requested stop, no failure


def test_second_ctrl_c_aborts_without_a_checkpoint(runs):
    run, code, tags = runs["abort"]
    assert code == 128 + signal.SIGINT, run.err()[-3000:]
    assert tags == ["step_00000003", "step_00000005"]  # nothing saved at or after step 7


def test_finished_run_summary_is_strict_json(runs):
    run, code, tags = runs["final"]
    assert code == 0, run.err()[-3000:]
    assert tags[-1] == f"step_{STEPS:08d}"
    summary = _strict((runs["work"] / "runs" / "claims" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == STEPS and summary["stopped_by_signal"] == 0
    for line in (runs["work"] / "runs" / "claims" / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_bf16_and_activation_checkpointing_are_really_on(runs):
    for label in ("usr1", "ctrlc", "final"):
        for p in runs[label][0].probes():
            assert p["bf16_enabled"] and p["dtype"] == "torch.bfloat16"
            # 2 blocks x 2 micro batches per rank per step, recomputed: at least one call each
            assert p["checkpointed_calls"] >= 2 * 2 * p["steps"], p


# The ops' CPU reference implementations, which a GPU run with the built kernels never calls (on a
# GPU, FusedAdamW's step counter is a CPU tensor, so its .item() is no device synchronisation), and
# the reference's label check, which reads tensors only when they are on the CPU.
CPU_ONLY = ("ce_rows_reference", "_step_reference", "_check_labels")


def test_at_most_one_host_sync_per_step(runs):
    for label in ("usr1", "ctrlc", "final"):
        for p in runs[label][0].probes():
            sites = {s: n for s, n in p["hot_sync_sites"].items() if s.split(":")[2] not in CPU_ONLY}
            assert p["steps"] > 0 and sum(sites.values()) <= p["steps"], sites
            assert any("guard.py" in s for s in sites)  # the one: the guard's reduced decision


def _records(runs, kind: str) -> list[dict]:
    lines = (runs["work"] / "runs" / "claims" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_periodic_eval_blended_and_per_source(runs):
    evals = {r["step"]: r for r in _records(runs, "eval")}
    assert set(evals) >= {2, 4, 6, STEPS}
    for r in evals.values():
        l0, l1 = r["loss_source0"], r["loss_source1"]
        assert all(math.isfinite(x) and 0 < x < math.log(320) + 1 for x in (l0, l1))
        assert abs(r["loss"] - (0.75 * l0 + 0.25 * l1)) < 1e-9  # weighted like the 3:1 blend
        assert abs(l0 - l1) > 1e-4  # two different sources are measured, not source 0 twice
    assert evals[STEPS]["loss"] < evals[2]["loss"]  # training lowers it
    out = runs["final"][0].stdout.read_text()
    assert re.search(rf"eval step {STEPS} \| loss [\d.]+ \| ppl [\d.]+ \| source0 [\d.]+ \| source1 [\d.]+", out)


def test_log_line_has_every_field(runs):
    out = runs["final"][0].stdout.read_text()
    line = re.compile(r"step (\d+)/8 \| loss [\d.]+ \| lr [\d.e+-]+ \| gnorm [\d.]+ \| tok/s [\d,]+ \| "
                      r"FLOP/s [\d.e+]+ \| mem [\d.]+ GiB \| eta \d+:\d\d:\d\d \| skipped 0")
    assert [int(m.group(1)) for m in line.finditer(out)] == [6, 8], out[-3000:]
    for r in _records(runs, "train"):
        assert r["mfu"] is None  # CPU: no peak, so FLOP/s instead of MFU
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and r["flops_per_s"] > 0
