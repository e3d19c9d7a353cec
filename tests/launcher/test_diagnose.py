"""launcher.diagnose: the collective watch names the ranks that never reached a step's
collective (through a real TCPStore) and makes every rank dump its stacks; SIGUSR2 dumps the
stacks of a live process without stopping it."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import time

import torch.distributed as dist

from launcher.diagnose import EXIT_HUNG, HANG_KEY, CollectiveWatch
from launcher.env import free_port
from tests.distributed.helper import REPO, cpu_env


def _wait(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _watched_ranks(world: int):
    """A rendezvous store plus one CollectiveWatch per rank (0.2 s timeout); give-ups are recorded
    as (rank, exit code) instead of ending the test process."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=datetime.timedelta(seconds=30),
                           wait_for_workers=False)
    gave_up: list[tuple[int, int]] = []
    watches = [CollectiveWatch(r, world, timeout_s=0.2, poll_s=0.02,
                               store=dist.TCPStore("127.0.0.1", port, world, is_master=False,
                                                   timeout=datetime.timedelta(seconds=30)),
                               give_up=lambda code, r=r: gave_up.append((r, code))) for r in range(world)]
    return server, watches, gave_up


def test_watch_names_missing_ranks_and_every_rank_dumps(capfd):
    server, watches, gave_up = _watched_ranks(3)
    try:
        for w in watches:
            w.arrive(1)
            w.left()
        watches[0].arrive(2)  # ranks 0 and 2 wait in step 2's collective; rank 1 never comes
        watches[2].arrive(2)
        _wait(lambda: server.check([HANG_KEY]), "the hang report")
        _wait(lambda: all(w._dumped for w in watches), "every rank's stack dump")
        _wait(lambda: len(gave_up) == 2, "both waiting ranks to give up at the full timeout")
    finally:
        for w in watches:
            w.close()
    err = capfd.readouterr().err
    assert "never reached it" in err and "rank(s) 1 never reached it" in err
    assert err.count("most recent call first") >= 3  # one dump per rank
    assert watches[0].missing(2) == [1]
    assert sorted(gave_up) == [(0, EXIT_HUNG), (2, EXIT_HUNG)]  # rank 1 was not waiting: it is the stuck one


def test_a_slow_step_that_every_rank_entered_is_no_hang(capfd):
    server, watches, gave_up = _watched_ranks(2)
    try:
        for w in watches:
            w.arrive(7)  # both ranks are inside step 7, which takes longer than the timeout
        # Deterministic: wait until each watch has polled several times after the full timeout.
        start = time.monotonic()
        late_polls = [0, 0]
        for i, w in enumerate(watches):
            def counted(i=i, poll=w._poll):
                poll()
                if time.monotonic() - start > 0.3:
                    late_polls[i] += 1
            w._poll = counted
        _wait(lambda: min(late_polls) >= 5, "the watches to poll past the timeout")
    finally:
        for w in watches:
            w.close()
    assert gave_up == [] and not server.check([HANG_KEY])
    assert "hang" not in capfd.readouterr().err


def test_single_rank_watch_is_inert():
    w = CollectiveWatch.for_job(0, 1)
    w.arrive(5)
    w.left()
    w.close()
    assert w.store is None


def test_sigusr2_dumps_stacks_and_the_process_keeps_running(tmp_path):
    script = ("import sys, time\nfrom launcher.diagnose import install_stack_dump\ninstall_stack_dump()\n"
              "def waiting_here():\n    print('ready', flush=True)\n    sys.stdin.readline()\n"
              "    print('still alive', flush=True)\nwaiting_here()\n")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=cpu_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGUSR2)
            # faulthandler writes the whole dump from the signal handler; wait until it is there.
            _wait(lambda: "waiting_here" in err_path.read_text(), "the stack dump")
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = err_path.read_text()
    assert "still alive" in out and proc.returncode == 0
    assert "most recent call first" in err and "waiting_here" in err
