"""`megalm submit CONFIG --nodes N --gpus-per-node G --time T [--partition P] [--dry-run]`.

Renders the sbatch script (package data: launcher/templates/sbatch.sh) — one srun task per GPU
(one per node with `--gpus-per-node 0`, CPU/gloo), `--requeue`, SIGUSR1 before the time limit,
requeue after a checkpointed stop, one log file per job — and submits it with `sbatch`.
Everything that can be checked before the job queues is checked here, each as one line.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.fsio import atomic_write
from megalm.train.config import load_config

DEFAULT_COLLECTIVE_TIMEOUT_S = 600


@dataclass
class SubmitSpec:
    config: str
    nodes: int
    gpus_per_node: int
    time: str
    partition: str = ""
    job_name: str = ""
    log_dir: str = "slurm-logs"
    workdir: str = "."
    overrides: list[str] = field(default_factory=list)
    signal_lead_s: int = 0  # 0: derived from the time limit
    cpus_per_task: int = 0  # 0: Slurm's default
    collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S
    # What each task runs; default `<this python> -m megalm.cli train`.
    entry: list[str] = field(default_factory=list)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time(text: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m or (m.group(1) is None and m.group(4) is not None and m.group(3) is None):
        raise UserError(f"--time: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]], got {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise UserError(f"--time: expected a positive time limit, got {text!r}")
    return seconds


def signal_lead(spec: SubmitSpec) -> int:
    """Seconds before the limit at which SIGUSR1 arrives: enough for a step and a save."""
    if spec.signal_lead_s:
        return spec.signal_lead_s
    return max(30, min(300, parse_time(spec.time) // 10))


def _check(spec: SubmitSpec) -> None:
    if spec.nodes < 1:
        raise UserError(f"--nodes: expected >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node: expected >= 0 (0 = CPU, one task per node), got {spec.gpus_per_node}")
    if spec.cpus_per_task < 0:
        raise UserError(f"--cpus-per-task: expected >= 0, got {spec.cpus_per_task}")
    if spec.collective_timeout_s <= 0:
        raise UserError(f"--collective-timeout: expected seconds > 0, got {spec.collective_timeout_s}")
    limit = parse_time(spec.time)
    if spec.signal_lead_s < 0 or spec.signal_lead_s >= limit:
        raise UserError(f"--signal-lead: expected 0 (auto) or fewer seconds than --time ({limit} s), "
                        f"got {spec.signal_lead_s}")
    if not Path(spec.config).is_file():
        raise UserError(f"{spec.config}: config file not found")

    # The config must fit this world (batch divisibility, pipeline stages) before it queues.
    load_config(spec.config, spec.overrides, world_size=spec.world_size)


def render(spec: SubmitSpec) -> str:
    _check(spec)
    entry = spec.entry or [sys.executable, "-m", "megalm.cli", "train"]
    command = [*entry, str(Path(spec.config).resolve()), *spec.overrides, "--resume", "auto"]
    resources_ = ""
    if spec.gpus_per_node:
        resources_ += f"#SBATCH --gpus-per-node={spec.gpus_per_node}\n"
    if spec.cpus_per_task:
        resources_ += f"#SBATCH --cpus-per-task={spec.cpus_per_task}\n"
    name = job_name(spec)
    values = {
        "JOB_NAME": name, "NODES": str(spec.nodes), "TASKS_PER_NODE": str(spec.tasks_per_node),
        "RESOURCES": resources_, "TIME": spec.time,
        "PARTITION": f"#SBATCH --partition={spec.partition}\n" if spec.partition else "",
        "SIGNAL_LEAD_S": str(signal_lead(spec)), "LOG_DIR": str(Path(spec.log_dir).resolve()),
        "WORKDIR": str(Path(spec.workdir).resolve()), "COMMAND": shlex.join(command),
        "COLLECTIVE_TIMEOUT_S": str(spec.collective_timeout_s),
    }
    if any(c.isspace() for c in name) or not name:
        raise UserError(f"--job-name: expected one word without spaces, got {name!r}")
    text = resources.files("launcher").joinpath("templates/sbatch.sh").read_text()
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], text)


def job_name(spec: SubmitSpec) -> str:
    return spec.job_name or f"megalm-{Path(spec.config).stem}"


def log_path(spec: SubmitSpec, job_id: str) -> Path:
    """The job's log (all runs of a requeued job append to it)."""
    return Path(spec.log_dir).resolve() / f"{job_name(spec)}-{job_id}.out"


def _slurm_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise UserError(f"submit: `{name}` not found: Slurm is not installed here (or not on PATH); submit from a "
                        f"Slurm login node, or try the local test cluster: slurm/local/install.sh && "
                        f"slurm/local/start.sh")
    return path


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"submit: `{shlex.join(cmd)}` failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc


def check_partition(partition: str) -> None:
    names = [p for p in _run([_slurm_tool("sinfo"), "-h", "-o", "%R"]).stdout.split() if p]
    if partition not in names:
        raise UserError(f"--partition: unknown partition {partition!r}; this cluster has: {', '.join(sorted(set(names)))}")


def submit(spec: SubmitSpec, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Render, save the script next to the logs, sbatch it (the job inherits `env`, default this
    process's environment); returns (job id, script path)."""
    script = render(spec)
    sbatch = _slurm_tool("sbatch")
    if spec.partition:
        check_partition(spec.partition)
    log_dir = Path(spec.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job_name(spec)}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    atomic_write(path, script)
    out = _run([sbatch, "--parsable", str(path)], env).stdout.strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"submit: sbatch printed {out!r}, expected a job id")
    return job_id, path


def _parse(argv: list[str]) -> tuple[SubmitSpec, bool]:
    p = Parser(prog="megalm submit", description=__doc__.splitlines()[0])
    p.add_argument("config", help="training YAML (as for megalm train)")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed to megalm train, e.g. train.steps=1000")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="one task per GPU; 0 = CPU, one task per node")
    p.add_argument("--time", required=True, help="time limit per run (Slurm format, e.g. 4:00:00 or 2-00:00:00)")
    p.add_argument("--partition", default="")
    p.add_argument("--job-name", default="")
    p.add_argument("--log-dir", default="slurm-logs", help="per-job logs <job-name>-<job id>.out (default: %(default)s)")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--signal-lead", type=int, default=0,
                   help="seconds before the time limit to send SIGUSR1 (default: a tenth of it, 30..300)")
    p.add_argument("--collective-timeout", type=int, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                   help="seconds a collective may wait for a peer before the job fails (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    a = p.parse_args(argv)
    spec = SubmitSpec(a.config, a.nodes, a.gpus_per_node, a.time, a.partition, a.job_name, a.log_dir, ".",
                      a.overrides, a.signal_lead, a.cpus_per_task, a.collective_timeout)
    return spec, a.dry_run


def main(argv: list[str]) -> int:
    spec, dry_run = _parse(argv)
    if dry_run:
        print(render(spec), end="")
        return 0
    job_id, path = submit(spec)
    print(job_id)
    print(f"submitted job {job_id} ({path}); log: {log_path(spec, job_id)}", file=sys.stderr)
    return 0
