"""`megalm launch`: ranks die with the launcher (PR_SET_PDEATHSIG + the parent check), SIGUSR1 and
SIGUSR2 are forwarded like SIGTERM, and `--help` is help. Waits are on files the ranks write, with
generous caps; nothing races a timer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.cli import _die_with
from tests.distributed.helper import REPO, cpu_env

LAUNCH = [sys.executable, "-m", "megalm.cli", "launch"]
CAP_S = 60.0

# Each rank records its pid, then sleeps: only a signal (or its launcher's death) ends it.
SLEEPER = ("import os, time\n"
           "p = os.path.join(os.environ['OUT'], 'pid' + os.environ['RANK'])\n"
           "open(p + '.tmp', 'w').write(str(os.getpid())); os.replace(p + '.tmp', p)\n"
           "time.sleep(600)\n")


def _wait_files(paths: list[Path], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + CAP_S
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"launcher exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped running; only its parent's reaping is left


def test_sigkill_of_the_launcher_leaves_no_rank(tmp_path):
    proc = subprocess.Popen([*LAUNCH, "--nproc", "2", "--", sys.executable, "-c", SLEEPER],
                            env=cpu_env() | {"OUT": str(tmp_path)}, stderr=subprocess.DEVNULL)
    _wait_files([tmp_path / "pid0", tmp_path / "pid1"], proc)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert all(_alive(p) for p in pids)
    proc.kill()
    proc.wait(timeout=CAP_S)
    deadline = time.monotonic() + CAP_S  # the kernel signals them at once; the cap is for a loaded box
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"ranks outlived their launcher: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def test_a_rank_whose_launcher_is_already_gone_does_not_start(tmp_path):
    # The getppid race: the launcher died between fork and prctl, so the child has another parent
    # than the launcher pid it was given; it must exit before running the command.
    marker = tmp_path / "ran"
    code = subprocess.call([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                           preexec_fn=_die_with(os.getpid() + 10**6))
    assert code == 125 and not marker.exists()
    assert subprocess.call([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                           preexec_fn=_die_with(os.getpid())) == 0 and marker.exists()


def test_sigusr1_and_sigusr2_are_forwarded(tmp_path):
    # USR2 (stack dump request) is passed on and the ranks keep running; USR1 (preemption) is passed
    # on and ends the job with 128 + SIGUSR1 like SIGTERM does.
    script = ("import os, signal, sys, time\n"
              "out, rank = os.environ['OUT'], os.environ['RANK']\n"
              "def mark(name): open(os.path.join(out, name + rank), 'w').close()\n"
              "signal.signal(signal.SIGUSR2, lambda *a: mark('usr2'))\n"
              "signal.signal(signal.SIGUSR1, lambda *a: (mark('usr1'), sys.exit(0)))\n"
              "mark('ready')\n"
              "time.sleep(600)\n"
              "time.sleep(600)\n")  # a handled USR2 ends the first sleep; USR1 exits
    proc = subprocess.Popen([*LAUNCH, "--nproc", "2", "--", sys.executable, "-c", script],
                            env=cpu_env() | {"OUT": str(tmp_path)}, stderr=subprocess.DEVNULL)
    _wait_files([tmp_path / "ready0", tmp_path / "ready1"], proc)
    proc.send_signal(signal.SIGUSR2)
    _wait_files([tmp_path / "usr20", tmp_path / "usr21"], proc)
    assert proc.poll() is None  # still running
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=CAP_S) == 128 + signal.SIGUSR1
    assert (tmp_path / "usr10").exists() and (tmp_path / "usr11").exists()


def test_help_is_help():
    proc = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, cwd=REPO, env=cpu_env(),
                          timeout=CAP_S)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: megalm launch --nproc N")
    assert "--" in proc.stdout and not proc.stderr
