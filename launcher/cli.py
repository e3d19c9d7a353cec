"""`megalm launch --nproc N [--master-port P] -- CMD...`: N local ranks with torchrun's env.

Signals are forwarded to every rank (SIGINT, SIGTERM, SIGUSR1: checkpoint and stop; SIGUSR2:
passed on for stack dumps); when one rank exits non-zero the others are terminated (then killed)
and the launcher exits with that rank's status, so a dead rank never leaves its peers hanging in a
collective. Ranks die with the launcher: each is started with PR_SET_PDEATHSIG, so a SIGKILLed
launcher (kill -9, the OOM killer) leaves no rank training on its own.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

from launcher.env import DistEnv, free_port
from megalm.cliparse import Parser
from megalm.errors import UserError

GRACE_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the ranks checkpoint and exit
FORWARDED = (*STOP_SIGNALS, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    p = Parser(
        prog="megalm launch", usage="megalm launch --nproc N [--master-port P] [--master-addr A] -- CMD [ARGS...]",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog="Ctrl-C (or SIGTERM/SIGUSR1) makes `megalm train` ranks checkpoint at the end of the step and "
               "exit with 128+signal; a second Ctrl-C aborts at once.")
    p.add_argument("--nproc", type=int, required=True, help="ranks to start on this machine")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    p.add_argument("--master-addr", default="127.0.0.1")
    args, extra = p.parse_known_args(argv[:cut])  # --help prints and exits 0 here
    if cut == len(argv):
        raise UserError("megalm launch: expected `--` before the command, e.g. megalm launch --nproc 2 -- python x.py")
    if extra:
        raise UserError(f"megalm launch: unknown option(s) {' '.join(extra)} before `--` (see megalm launch --help)")
    cmd = argv[cut + 1 :]
    if args.nproc < 1:
        raise UserError(f"megalm launch: --nproc: expected >= 1, got {args.nproc}")
    if not cmd:
        raise UserError("megalm launch: expected a command after `--`")
    return args, cmd


def _die_with(launcher_pid: int):
    """preexec_fn for a rank: SIGKILL it when the launcher dies. The launcher may have died
    between fork and prctl (the rank would then be re-parented and never signalled): check the
    parent after arming, and exit at once if it is not the launcher any more."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)  # cannot promise the rank dies with us: do not start it
        if os.getppid() != launcher_pid:
            os._exit(125)

    return arm


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    """Signal each live rank's process group (each rank leads its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _wait(procs: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    _signal_all(procs, sig)
    _wait(procs, GRACE_S)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv: list[str]) -> int:
    args, cmd = _parse(argv)
    port = args.master_port or free_port()
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if signum in STOP_SIGNALS:
            received.append(signum)
        _signal_all(procs, signum)

    # Handlers first and every spawn inside the try: a signal or a failed spawn mid-way still
    # stops the ranks already started (the finally kills them).
    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        for rank in range(args.nproc):
            if received:
                return 128 + received[0]
            env = dict(os.environ)
            DistEnv(rank, args.nproc, rank, args.nproc, args.master_addr, port, "torchrun").export(env)
            # Like torchrun: N ranks each using every core oversubscribe the CPU; share the cores.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
            # Each rank in its own process group so we can signal its children too.
            try:
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                              preexec_fn=_die_with(os.getpid())))
            except OSError as exc:
                raise UserError(f"megalm launch: cannot run {cmd[0]!r}: {exc.strerror or exc}") from None
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                if code - 128 in STOP_SIGNALS:
                    # Stopped on request (a signal sent to the ranks themselves): they agreed on the
                    # step and checkpointed together, so the others are exiting too; let them.
                    _wait(procs, GRACE_S)
                elif not received:
                    print(f"megalm launch: rank {rank} exited with status {code}; stopping the other ranks",
                          file=sys.stderr)
                _stop(procs)
                return 128 + received[0] if received else (code if code > 0 else 128 - code)
            if all(c == 0 for c in codes):
                # Ranks that shut down cleanly on a forwarded signal still report the interruption.
                return 128 + received[0] if received else 0
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop(procs, signal.SIGKILL)
