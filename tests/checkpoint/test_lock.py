"""One trainer per run: the flock on the checkpoint folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.checkpoint.lock import RunLock
from megalm.errors import UserError

HOLD = """
import sys
from megalm.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until killed
"""


def test_second_holder_is_refused_naming_host_and_pid_then_lock_is_free_after_release(tmp_path):
    path = str(tmp_path / ".lock")
    first, second = RunLock(path), RunLock(path)
    first.acquire()
    with pytest.raises(UserError) as info:
        second.acquire()
    msg = str(info.value)
    assert "\n" not in msg and f"host {socket.gethostname()}, pid {os.getpid()}" in msg and str(tmp_path) in msg
    first.release()
    second.acquire()
    assert second.held
    second.release()


def test_lock_of_a_sigkilled_holder_is_released_by_the_kernel(tmp_path):
    path = str(tmp_path / ".lock")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"  # the child holds it now: no race
        with pytest.raises(UserError, match=f"pid {proc.pid},"):
            RunLock(path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mine = RunLock(path)
    mine.acquire()  # no stale lock to clean up by hand
    mine.release()


def test_a_filesystem_without_flock_warns_and_trains_unguarded(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = RunLock(str(tmp_path / ".lock"))
    lock.acquire()
    assert not lock.held and "cannot lock files (Function not implemented)" in capsys.readouterr().err
