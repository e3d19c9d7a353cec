"""Two real gloo processes: what the ranks take together equals the single-rank stream, and
state moves between 2 ranks and 1 rank (both ways) with no sample repeated or skipped."""

from __future__ import annotations

import json
import os

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from megalm.data import DataConfig, build_loader
from tests.data.shards import unique_docs, write_shard_dir

GB, MICRO, SEQ = 8, 2, 10


def _keys(step) -> list[list[int]]:
    return [row for mb in step for row in mb["input_ids"].tolist()]


def _worker(rank: int, world: int, init_file: str, cfg: DataConfig, workdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # A: a fresh 2-rank run for 3 steps, then its state (to be resumed by 1 rank)
        ld = build_loader(cfg, GB, MICRO, rank, world)
        mine = [k for _ in range(3) for k in _keys(next(ld))]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"keys": mine, "state": ld.state_dict()})
        # B: continue a 1-rank run's state on 2 ranks for 3 steps
        with open(os.path.join(workdir, "state_1rank.json")) as f:
            state = json.load(f)
        ld = build_loader(cfg, GB, MICRO, rank, world)
        ld.load_state_dict(state)
        mine_b = []
        for _ in range(3):
            step = _keys(next(ld))
            both: list = [None] * world
            dist.all_gather_object(both, step)  # per step, so the global order can be rebuilt
            mine_b += [k for part in both for k in part]
        if rank == 0:
            out = {"a": [g["keys"] for g in gathered], "a_states": [g["state"] for g in gathered], "b": mine_b}
            with open(os.path.join(workdir, "result.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_resume_both_ways(tmp_path):
    rng = np.random.default_rng(5)
    d = write_shard_dir(str(tmp_path / "shards"), {"train": unique_docs(60, rng)})
    cfg = DataConfig(paths=[d], seq_len=SEQ, seed=21)

    straight = build_loader(cfg, GB, MICRO)
    straight_keys = [_keys(next(straight)) for _ in range(6)]

    one = build_loader(cfg, GB, MICRO)
    for _ in range(2):
        next(one)
    with open(tmp_path / "state_1rank.json", "w") as f:
        json.dump(one.state_dict(), f)

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), cfg, str(tmp_path)), nprocs=2, join=True)
    with open(tmp_path / "result.json") as f:
        res = json.load(f)

    # A: per step, rank 0 takes the first half of the global batch and rank 1 the second
    a0, a1 = res["a"]
    half = GB // 2
    rebuilt = [a0[s * half : (s + 1) * half] + a1[s * half : (s + 1) * half] for s in range(3)]
    assert rebuilt == straight_keys[:3]
    assert res["a_states"][0] == res["a_states"][1]
    # ...and 1 rank resumes the 2-rank state exactly at step 3
    resumed = build_loader(cfg, GB, MICRO)
    resumed.load_state_dict(res["a_states"][0])
    assert [_keys(next(resumed)) for _ in range(3)] == straight_keys[3:]

    # B: 2 ranks continue the 1-rank state (2 steps done) with steps 2, 3, 4 of the straight run
    assert res["b"] == [k for step in straight_keys[2:5] for k in step]
    seen = [tuple(k) for step in straight_keys[:2] for k in step] + [tuple(k) for k in res["b"]]
    assert len(seen) == len(set(seen)) == 5 * GB  # no repeat; the equality above rules out a skip
