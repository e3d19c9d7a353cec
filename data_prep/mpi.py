"""Multi-node split: mpi4py ranks when launched by mpiexec/srun, a 1-rank stand-in otherwise.

mpi4py is imported only when an MPI launcher set its environment, so a plain run needs no MPI.
"""

from __future__ import annotations

import os
from typing import Any

_LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def launched_under_mpi() -> bool:
    return any(name in os.environ for name in _LAUNCHER_ENV)


class LocalComm:
    """The single-process world: collectives are identities."""

    rank, size = 0, 1

    def bcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


class MpiComm:
    def __init__(self) -> None:
        # importing MPI initialises it: only a run started by mpirun may do that
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def barrier(self) -> None:
        self._comm.Barrier()


def world() -> LocalComm | MpiComm:
    return MpiComm() if launched_under_mpi() else LocalComm()
