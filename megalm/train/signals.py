"""Stop requests: SIGTERM / SIGUSR1 (preemption) and the first Ctrl-C ask the run to checkpoint at
the end of the current step and exit; a second Ctrl-C aborts at once (the OS default action).

Handlers only record the signal on the StepGuard, whose once-per-step reduction tells every rank
(see guard.py). Output from a handler goes through os.write: a print could re-enter a buffered
stream the interrupted code was writing to.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from megalm.fsio import atomic_write
from megalm.train.guard import StepGuard

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
WAIT_CAP_S = 600.0  # the test hook gives up (an error, never a silent pass) after this long


class StopRequests:
    def __init__(self, guard: StepGuard, rank: int):
        self.guard, self.rank = guard, rank
        self.received = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python allows handlers only in the main thread (e.g. a trainer under a test)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.received += 1
        if not self.guard.pending_signal:
            self.guard.pending_signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C kills the process
            if self.rank == 0:
                os.write(2, b"interrupted: checkpointing at the end of this step, then exiting; "
                            b"press Ctrl-C again to abort at once (losing the work since the last checkpoint)\n")

    def wait_for(self, count: int, marker: Path) -> None:
        """Test hook (debug.wait_at_step): announce `marker`, then block until this process has
        received `count` signals, so a test signals a run at an exact step without sleeping."""
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, str(os.getpid()))  # whole or absent: a test reads the pid
        deadline = time.monotonic() + WAIT_CAP_S
        while self.received < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"debug.wait_at_step: no signal within {WAIT_CAP_S:.0f} s ({marker})")
            time.sleep(0.01)
