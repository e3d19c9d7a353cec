"""Where am I in the job? Rank/world/master discovered from torchrun, the deepspeed launcher,
mpirun (Open MPI) or srun, so one trainer entry point runs under any of them."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from megalm.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | mpirun | srun | single

    def export(self, environ: dict[str, str] | os._Environ = os.environ) -> None:
        """Write the torchrun-style variables torch.distributed / DeepSpeed read."""
        environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port_from_job(job_id: str | None) -> int:
    # Same on every task of the job, different across concurrent jobs on a node.
    return 20000 + (int(job_id) % 20000) if job_id and job_id.isdigit() else 29500


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    text = env.get("MASTER_PORT", "29500")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UserError(f"MASTER_PORT: expected a port number 1..65535, got {text!r}")
    port = int(text)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, megalm launch
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
            int(env.get("LOCAL_WORLD_SIZE", world)), addr, port, "torchrun",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
        if world > local_world and "MASTER_ADDR" not in env:
            # 127.0.0.1 would make every node rendezvous with itself and hang.
            raise UserError(f"MASTER_ADDR: mpirun started {world} ranks over several nodes ({local_world} on this "
                            f"one); set MASTER_ADDR to rank 0's host (e.g. mpirun -x MASTER_ADDR=<host>)")
        return DistEnv(
            int(env["OMPI_COMM_WORLD_RANK"]), world, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            local_world, addr, port, "mpirun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world
        if "MASTER_ADDR" not in env:
            addr = first_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        if "MASTER_PORT" not in env:
            port = _port_from_job(env.get("SLURM_JOB_ID"))
        return DistEnv(
            int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, addr, port, "srun",
        )
    # One process, no launcher: nobody else needs to know the port, so take a free one (a fixed
    # default would collide with a second single-process run on this machine).
    if "MASTER_PORT" not in env:
        port = free_port()
    return DistEnv(0, 1, 0, 1, addr, port, "single")


def set_accelerator_default() -> str:
    """DeepSpeed must be told to use its CPU accelerator when there is no CUDA device."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
