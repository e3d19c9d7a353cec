"""Preemption stress on the local Slurm cluster: N jobs, each stopped with `scancel --signal=USR1`
at a different step, checkpointed, requeued, resumed; counts how many finish with final weights
identical to one uninterrupted job. Prints JSON.

    python scripts/stress_preempt.py --trials 10 [--workdir DIR]

Needs Slurm (slurm/local/install.sh); starts the local cluster if none runs (stops it after).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.slurm.cluster import Cluster, preempt_and_resume, submit_training, wait_final  # noqa: E402

STEPS = 6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="megalm-stress-preempt-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster.start()
    counts = {"trials": args.trials, "completed": 0, "requeued_once": 0, "resumed_from_signal_step": 0,
              "identical_weights": 0, "failures": []}
    t0 = time.time()
    try:
        base = submit_training(workdir, "straight", steps=STEPS)
        if wait_final(base.job_id, base.log)["JobState"] != "COMPLETED":
            raise SystemExit(f"baseline job failed; see {base.log}")
        reference = json.loads((base.run_dir / "summary.json").read_text())["weights_sha256"]
        for trial in range(args.trials):
            pause = 1 + trial % (STEPS - 1)  # every step but the last, in turn
            job = submit_training(workdir, f"stress{trial}", steps=STEPS, hooks={"MEGALM_TEST_PAUSE_AT": str(pause)})
            try:
                info = preempt_and_resume(job, pause_at=pause)
            except AssertionError as exc:
                counts["failures"].append(f"trial {trial}: {str(exc).splitlines()[0]}")
                continue
            log = job.log.read_text()
            summary_path = job.run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            ok = {
                "completed": info.get("JobState") == "COMPLETED" and summary.get("finished") is True,
                "requeued_once": info.get("Restarts") == "1",
                "resumed_from_signal_step": f"resumed from step {pause + 1} " in log,  # the step in flight completes
                "identical_weights": summary.get("weights_sha256") == reference,
            }
            for key, good in ok.items():
                counts[key] += int(good)
            if not all(ok.values()):
                counts["failures"].append(f"trial {trial} (pause at {pause}): {ok}; log {job.log}")
            print(f"trial {trial}: pause at step {pause}: {ok}", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    counts["seconds"] = round(time.time() - t0, 1)
    counts["workdir"] = str(workdir)
    print(json.dumps(counts, indent=1))
    return 0 if not counts["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
