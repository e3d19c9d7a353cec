"""Hang diagnosis for multi-rank jobs (no peer trainer has it built in).

- `install_stack_dump()`: SIGUSR2 (e.g. `scancel --signal=USR2 JOB`) makes a rank write every
  thread's Python stack to stderr — the job log — and keep running. faulthandler does this from C,
  so it works while the rank is blocked inside a collective.
- `CollectiveWatch`: each rank records in the job's rendezvous store the last step whose
  collectives it entered (the step guard marks it at the start of a step and clears it once the
  step's one reduction returned). When a rank has waited for half the collective timeout while
  some peer never entered that step, it logs which ranks are missing and flags the hang in the
  store; every rank then dumps its stacks, so the log shows where the missing ranks are stuck. At
  the full timeout the waiting rank exits with EXIT_HUNG: the process groups DeepSpeed creates for
  ZeRO do not all carry our timeout, so without this a dead or stuck peer could hang the job.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import sys
import threading
import time

from launcher.env import collective_timeout

HANG_KEY = "megalm/diagnose/hang"
EXIT_HUNG = 124  # like timeout(1): the job failed on a peer that never arrived
POLL_S = 2.0


def install_stack_dump(sig: int = signal.SIGUSR2) -> None:
    faulthandler.register(sig, file=sys.stderr, all_threads=True, chain=False)


def _dump(header: str) -> None:
    print(header, file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()


class CollectiveWatch:
    """Per rank; `arrive(step)` when a step's collectives begin, `left()` once its reduction returned."""

    def __init__(self, rank: int, world: int, timeout_s: float, store=None, poll_s: float = POLL_S,
                 give_up=os._exit):
        self.rank, self.world, self.timeout_s, self.after_s, self.poll_s = rank, world, timeout_s, timeout_s / 2, poll_s
        self.store = store
        self.give_up = give_up  # called with EXIT_HUNG at the full timeout (tests pass a recorder)
        self._step, self._since = 0, None
        self._reported = self._dumped = False
        self._stop = threading.Event()
        self._thread = None
        if store is not None and world > 1:
            self._thread = threading.Thread(target=self._run, name="megalm-collective-watch", daemon=True)
            self._thread.start()

    @classmethod
    def for_job(cls, rank: int, world: int) -> "CollectiveWatch":
        """Watch on the job's rendezvous store (a second client: the main thread may be blocked
        on the first), with the timeout the process group got."""
        timeout = collective_timeout(os.environ)
        if world < 2:
            return cls(rank, world, timeout)
        # torch takes a second to import: the launcher itself never needs it
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=datetime.timedelta(seconds=max(30.0, timeout)))
        return cls(rank, world, timeout, store)

    def arrive(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"megalm/diagnose/arrived/{self.rank}", str(step))
        self._step, self._since, self._reported = step, time.monotonic(), False  # one report per wait

    def left(self) -> None:
        self._since = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2)

    def missing(self, step: int) -> list[int]:
        """Ranks whose last arrival is before `step` (never reached this step's collective)."""
        late = []
        for r in range(self.world):
            key = f"megalm/diagnose/arrived/{r}"
            if not self.store.check([key]) or int(self.store.get(key)) < step:
                late.append(r)
        return late

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._poll()
            except Exception as exc:  # the store went away: the job is ending
                print(f"megalm: collective watch on rank {self.rank} stopped: {exc}", file=sys.stderr, flush=True)
                return

    def _poll(self) -> None:
        since, step = self._since, self._step
        waited = 0.0 if since is None else time.monotonic() - since
        if since is not None and waited > self.after_s and (not self._reported or waited > self.timeout_s):
            late = self.missing(step)
            if late and not self._reported:  # a slow step that every rank entered is no hang
                self._reported = True
                msg = (f"megalm: hang: rank {self.rank} has waited {waited:.0f} s for the collective of step "
                       f"{step}; rank(s) {', '.join(map(str, late))} never reached it")
                self.store.set(HANG_KEY, msg)
                if not self._dumped:
                    self._dumped = True
                    _dump(msg + f"; stacks of rank {self.rank}:")
            if late and waited > self.timeout_s:
                print(f"megalm: hang: rank {self.rank} gives up after {waited:.0f} s (collective timeout "
                      f"{self.timeout_s:.0f} s) waiting for rank(s) {', '.join(map(str, late))} at step {step}; "
                      f"exiting with {EXIT_HUNG}", file=sys.stderr, flush=True)
                self.give_up(EXIT_HUNG)
                self._since = None  # (only reached when give_up returns, as in tests)
        if not self._dumped and self.store.check([HANG_KEY]):
            self._dumped = True
            _dump(f"megalm: hang reported ({self.store.get(HANG_KEY).decode()}); stacks of rank {self.rank}:")
