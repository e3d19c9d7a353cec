"""Where am I in the job? Rank/world/master discovered from torchrun, the deepspeed launcher,
mpirun (Open MPI, MPICH/Intel MPI) or srun, so one trainer entry point runs under any of them.

Under MPI without MASTER_ADDR/MASTER_PORT, rank 0 picks its address and a free port and
broadcasts them over MPI (mpi4py). Under srun the address is the first node of the job and the
port is derived from the job id, so every task computes the same pair without talking.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping

from megalm.errors import UserError

# Seconds a collective may wait for its peers before the job fails (a dead or stuck rank must
# end the job, not hang it). Override with MEGALM_COLLECTIVE_TIMEOUT.
DEFAULT_TIMEOUT_S = 600

# (address, port) chosen by rank 0 -> the same pair on every rank.
Exchange = Callable[[tuple[str, int]], tuple[str, int]]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | mpirun | srun | single
    timeout_s: float = DEFAULT_TIMEOUT_S

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


# ---- Slurm node lists ----------------------------------------------------------------------
def _expand_ranges(body: str, what: str) -> list[str]:
    out = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"{what}: bad range {part!r} in a Slurm node list")
        if not hi:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"{what}: range {part!r} runs backwards")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Slurm's compressed host list, expanded: 'gpu[03-04,07],cpu1' -> gpu03 gpu04 gpu07 cpu1.

    Several bracket groups in one name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2),
    as `scontrol show hostnames` does.
    """
    depth = 0
    for ch in nodelist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise UserError(f"{what}: unbalanced brackets in {nodelist!r}")
    if depth:
        raise UserError(f"{what}: unbalanced brackets in {nodelist!r}")
    hosts: list[str] = []
    # Split on commas outside brackets.
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        pieces = re.split(r"\[([^\]]*)\]", name)
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, what) for i, p in enumerate(pieces)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise UserError(f"{what}: empty node list")
    return hosts


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    return expand_nodelist(nodelist)[0]


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def node_address(node: str) -> str:
    """An address for a Slurm node name: the name itself when it resolves, else the NodeAddr
    Slurm uses to reach it (node names need not be DNS names, e.g. an emulated cluster). When
    Slurm cannot say either, the name is kept and the rendezvous reports it."""
    if _resolvable(node):
        return node
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


def port_from_job(job_id: str | None) -> int:
    # Same on every task of the job, different across concurrent jobs on a node.
    return 20000 + (int(job_id) % 20000) if job_id and job_id.isdigit() else 29500


# ---- discovery -----------------------------------------------------------------------------
def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    text = env.get(key)
    if text is None:
        if default is None:
            raise UserError(f"{key}: missing from the environment")
        return default
    text = text.split("(")[0]  # SLURM_NTASKS_PER_NODE='2(x3)'
    if not text.isdigit():
        raise UserError(f"{key}: expected a non-negative integer, got {text!r}")
    return int(text)


def collective_timeout(env: Mapping[str, str]) -> float:
    text = env.get("MEGALM_COLLECTIVE_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"MEGALM_COLLECTIVE_TIMEOUT: expected seconds > 0, got {text!r}")
    return value


def _check(d: DistEnv, keys: str) -> DistEnv:
    if d.world_size < 1 or not 0 <= d.rank < d.world_size:
        raise UserError(f"{keys}: inconsistent world: rank {d.rank} of world size {d.world_size} "
                        f"(expected 0 <= rank < world size)")
    if not 0 <= d.local_rank < d.local_world_size <= d.world_size:
        raise UserError(f"{keys}: inconsistent world: local rank {d.local_rank} of {d.local_world_size} on this node, "
                        f"world size {d.world_size} (expected local rank < local size <= world size)")
    return d


def _mpi_exchange(pair: tuple[str, int]) -> tuple[str, int]:
    # importing MPI initialises it: only ranks started by mpirun may do that
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(pair, root=0)


def _mpi_world(env: Mapping[str, str]) -> tuple[int, int, int, int, str] | None:
    """(rank, world, local rank, local world, variable names) from Open MPI or MPICH/Intel MPI."""
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        return (_int(env, "OMPI_COMM_WORLD_RANK"), world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world), "OMPI_COMM_WORLD_*")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world = _int(env, "PMI_SIZE")
        return (_int(env, "PMI_RANK"), world, _int(env, "MPI_LOCALRANKID", 0), _int(env, "MPI_LOCALNRANKS", world),
                "PMI_RANK/PMI_SIZE")
    return None


def discover(environ: Mapping[str, str] | None = None, exchange: Exchange | None = None) -> DistEnv:
    """The rank layout from the launcher's variables. With the real environment (`environ` None)
    MPI ranks missing MASTER_ADDR/PORT agree on them over mpi4py; `exchange` replaces that."""
    env = os.environ if environ is None else environ
    if exchange is None and environ is None:
        exchange = _mpi_exchange
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    text = env.get("MASTER_PORT", "29500")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UserError(f"MASTER_PORT: expected a port number 1..65535, got {text!r}")
    port = int(text)
    timeout = collective_timeout(env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, megalm launch
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        return _check(DistEnv(rank, world, _int(env, "LOCAL_RANK", rank), _int(env, "LOCAL_WORLD_SIZE", world),
                              addr, port, "torchrun", timeout), "RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE")
    mpi = _mpi_world(env)
    if mpi is not None:
        rank, world, local_rank, local_world, keys = mpi
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            if exchange is not None:
                mine = (_own_address(local_world < world), free_port()) if rank == 0 else ("", 0)
                chosen = exchange(mine)
                addr = env.get("MASTER_ADDR", chosen[0])
                port = int(env.get("MASTER_PORT", chosen[1]))
            elif world > local_world and "MASTER_ADDR" not in env:
                # 127.0.0.1 would make every node rendezvous with itself and hang.
                raise UserError(f"MASTER_ADDR: mpirun started {world} ranks over several nodes ({local_world} on "
                                f"this one); set MASTER_ADDR to rank 0's host (e.g. mpirun -x MASTER_ADDR=<host>)")
        return _check(DistEnv(rank, world, local_rank, local_world, addr, port, "mpirun", timeout), keys)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", 0) or world
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = node_address(first_host(nodes)) if nodes else "127.0.0.1"
        if "MASTER_PORT" not in env:
            port = port_from_job(env.get("SLURM_JOB_ID"))
        return _check(DistEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), local_world, addr,
                              port, "srun", timeout), "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID")
    # One process, no launcher: nobody else needs to know the port, so take a free one (a fixed
    # default would collide with a second single-process run on this machine).
    if "MASTER_PORT" not in env:
        port = free_port()
    return DistEnv(0, 1, 0, 1, addr, port, "single", timeout)


def _own_address(multi_node: bool) -> str:
    """Rank 0's address for its peers: loopback when they are all on this node."""
    if not multi_node:
        return "127.0.0.1"
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = ""
    if not addr or addr.startswith("127."):
        # Peers on other nodes cannot reach a loopback address.
        raise UserError(f"MASTER_ADDR: this host ({host}) resolves only to {addr or 'nothing'}, which other nodes "
                        f"cannot reach; set MASTER_ADDR (e.g. mpirun -x MASTER_ADDR=<host>)")
    return addr


def set_accelerator_default() -> str:
    """DeepSpeed must be told to use its CPU accelerator when there is no CUDA device."""
    if "DS_ACCELERATOR" not in os.environ:
        # torch takes a second to import: `megalm launch` itself never needs it
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
