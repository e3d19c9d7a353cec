"""The trainer's positive word to the batch script that it stopped on a signal *after* its
checkpoint was published, so requeueing resumes without loss.

An exit status alone cannot say this under srun: when one rank exits 128+signal first,
`--kill-on-bad-exit` terminates the others and srun may report 143 — the same status a rank
killed mid-step without any checkpoint gives. The sbatch template sets MEGALM_STOP_FILE, removes it
before each run, and requeues only when rank 0 wrote it.
"""

from __future__ import annotations

import json
import os

from megalm.fsio import atomic_write

ENV = "MEGALM_STOP_FILE"


def note_checkpointed_stop(rank: int, signum: int, step: int) -> None:
    """Rank 0, after the stop checkpoint is published: record it where the batch script looks."""
    path = os.environ.get(ENV)
    if rank == 0 and path:
        atomic_write(path, json.dumps({"signal": signum, "step": step}) + "\n")
