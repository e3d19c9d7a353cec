"""launcher.env: world discovery from torchrun / deepspeed / Open MPI / MPICH / srun variables,
Slurm node lists, the MPI address exchange, timeouts, and one-line errors for inconsistent input."""

from __future__ import annotations

import pytest

from launcher.env import DEFAULT_TIMEOUT_S, discover, expand_nodelist, port_from_job
from megalm.errors import UserError


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("a1,b2", ["a1", "b2"]),
    ("gpu[03-05,07],cpu1", ["gpu03", "gpu04", "gpu05", "gpu07", "cpu1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x-[1-2].ib,y", ["x-1.ib", "x-2.ib", "y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("a[1-2", "unbalanced brackets"), ("a]", "unbalanced brackets"), ("a[[1]]", "unbalanced brackets"),
    ("a[3-1]", "runs backwards"), ("a[x]", "bad range 'x'"), ("", "empty node list"),
])
def test_bad_nodelist_is_one_line(nodelist, message):
    with pytest.raises(UserError, match=message) as info:
        expand_nodelist(nodelist)
    assert "SLURM_JOB_NODELIST" in str(info.value) and "\n" not in str(info.value)


def test_srun_world_from_slurm_variables():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "localhost,other", "SLURM_JOB_ID": "4242"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.source) == (3, 4, 1, 2, "srun")
    # First node of the job; every task derives the same port from the job id.
    assert d.master_addr == "localhost" and d.master_port == port_from_job("4242") == 24242
    assert discover(env | {"SLURM_PROCID": "0"}).master_port == d.master_port
    assert discover(env | {"SLURM_JOB_ID": "4243"}).master_port != d.master_port
    # The step's node list wins over the job's (a step may use a subset of the allocation).
    assert discover(env | {"SLURM_STEP_NODELIST": "127.0.0.1"}).master_addr == "127.0.0.1"
    assert discover(env | {"MASTER_ADDR": "h0", "MASTER_PORT": "1234"}).master_addr == "h0"


def test_torchrun_and_deepspeed_launcher_variables():
    # The deepspeed launcher sets the same variables as torchrun (plus CROSS_RANK etc.).
    d = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "CROSS_RANK": "1",
                  "MASTER_ADDR": "n1", "MASTER_PORT": "29501"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port) == \
        (5, 8, 1, 4, "n1", 29501)
    # torchrun inside srun: torchrun's variables describe the real world.
    d = discover({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (d.rank, d.world_size, d.source) == (1, 2, "torchrun")


def test_mpi_ranks_agree_on_rank0s_address_and_port():
    sent = []

    def exchange(pair):  # what MPI's bcast from rank 0 returns on every rank
        sent.append(pair)
        return ("10.0.0.7", 31337)

    one_node = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    d = discover(one_node, exchange=exchange)
    assert sent[0][0] == "127.0.0.1" and 0 < sent[0][1] < 65536  # rank 0 offers loopback + a free port
    assert (d.master_addr, d.master_port, d.source) == ("10.0.0.7", 31337, "mpirun")
    rank1 = discover(one_node | {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, exchange=exchange)
    assert sent[1] == ("", 0) and (rank1.rank, rank1.master_port) == (1, 31337)
    # Explicit variables win and need no exchange.
    assert discover(one_node | {"MASTER_ADDR": "a", "MASTER_PORT": "5"}, exchange=None).master_port == 5
    # MPICH / Intel MPI.
    d = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
                 exchange=lambda pair: ("h", 7))
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (1, 2, 1, "h", 7)


def test_multinode_mpi_without_exchange_or_master_addr_is_one_line():
    multi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(UserError, match="MASTER_ADDR: mpirun started 4 ranks over several nodes"):
        discover(multi)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK/WORLD_SIZE.*rank 2 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "rank 0 of world size 0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, "local size <= world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected a non-negative integer, got 'x'"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "localhost"}, "SLURM_PROCID.*rank 4 of world size 4"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "2",
      "SLURM_JOB_NODELIST": "localhost"}, "local rank 3 of 2"),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
     "OMPI_COMM_WORLD_.*rank 3 of world size 2"),
    ({"MEGALM_COLLECTIVE_TIMEOUT": "0"}, "MEGALM_COLLECTIVE_TIMEOUT: expected seconds > 0"),
    ({"MEGALM_COLLECTIVE_TIMEOUT": "soon"}, "MEGALM_COLLECTIVE_TIMEOUT"),
])
def test_inconsistent_worlds_are_one_line(env, message):
    with pytest.raises(UserError, match=message) as info:
        discover(env)
    assert "\n" not in str(info.value)


def test_collective_timeout_default_and_override():
    assert discover({}).timeout_s == DEFAULT_TIMEOUT_S
    assert discover({"MEGALM_COLLECTIVE_TIMEOUT": "45"}).timeout_s == 45.0


def test_unresolvable_node_name_uses_slurms_node_address(monkeypatch):
    import launcher.env as env_mod

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return type("P", (), {"stdout": "NodeName=node7 Arch=x86_64\n   NodeAddr=10.1.2.3 NodeHostName=h7\n"})()

    monkeypatch.setattr(env_mod.subprocess, "run", fake_run)
    d = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[7-8].invalid"})
    assert d.master_addr == "10.1.2.3" and calls == [["scontrol", "show", "node", "node7.invalid"]]
    monkeypatch.setattr(env_mod.subprocess, "run", lambda cmd, **kw: (_ for _ in ()).throw(FileNotFoundError()))
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[1-2].invalid"}).master_addr \
        == "x1.invalid"
