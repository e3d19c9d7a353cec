"""`megalm train` with explicit test hooks, so Slurm tests act at a known step instead of racing
the run (used as the task command by tests/slurm and scripts/stress_preempt.py).

MEGALM_TEST_MARKERS=DIR       every rank writes DIR/pid.rank<r> when its first step is done
MEGALM_TEST_PAUSE_AT=K        first run only: after step K each rank writes DIR/paused.rank<r> and
                              waits until a stop signal (SIGUSR1/SIGTERM) reached it
MEGALM_TEST_DIE_AT=R:K        first run only: rank R SIGKILLs itself after step K
MEGALM_TEST_SLEEP_AT=R:K:S    first run only: rank R writes DIR/sleeping.rank<R> after step K,
                              then sleeps S seconds inside the step (a stuck rank)
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _mark(name: str, text: str = "") -> None:
    path = os.path.join(os.environ["MEGALM_TEST_MARKERS"], name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def install() -> None:
    import megalm.train.loop as loop

    first_run = int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
    pause_at = int(os.environ.get("MEGALM_TEST_PAUSE_AT") or 0) if first_run else 0
    die = os.environ.get("MEGALM_TEST_DIE_AT", "") if first_run else ""
    die_rank, die_step = (int(x) for x in die.split(":")) if die else (-1, -1)
    sleep = os.environ.get("MEGALM_TEST_SLEEP_AT", "") if first_run else ""
    sleep_rank, sleep_step, sleep_s = (int(x) for x in sleep.split(":")) if sleep else (-1, -1, 0)
    original = loop.Trainer.train_step

    def train_step(self, micro):
        original(self, micro)
        if not os.path.exists(os.path.join(os.environ["MEGALM_TEST_MARKERS"], f"pid.rank{self.rank}")):
            _mark(f"pid.rank{self.rank}", str(os.getpid()))
        if self.step == pause_at:
            _mark(f"paused.rank{self.rank}", str(os.getpid()))
            deadline = time.monotonic() + 600  # never a hang, even if the test forgets to signal
            while not self.guard.pending_signal:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test hook: no stop signal within 600 s at step {pause_at}")
                time.sleep(0.01)  # a signal interrupts the sleep; its handler sets guard.pending_signal
        if self.rank == die_rank and self.step == die_step:
            _mark(f"dying.rank{self.rank}", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

        if self.rank == sleep_rank and self.step == sleep_step:
            _mark(f"sleeping.rank{self.rank}", str(os.getpid()))
            time.sleep(sleep_s)

    loop.Trainer.train_step = train_step


if __name__ == "__main__":
    install()
    from megalm.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
