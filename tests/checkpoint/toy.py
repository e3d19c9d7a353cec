"""A toy DeepSpeed training program driven by the checkpoint tests (a helper, not a test module).

Run as a program: `python tests/checkpoint/toy.py '<json args>'` (1 rank) or under
torchrun (2 ranks). It trains a stack of Linear layers with DeepSpeed on CPU (gloo), saving and
resuming through CheckpointManager, and writes what it saw (losses as float.hex, state digests)
to args["out"].<rank>.json. Data is a pure function of (step, global sample index), so any DP size
sees the same global batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading

import torch

from megalm.checkpoint.config import CheckpointConfig

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


# ------------------------------------------------------------------------------------------------
# The toy program
# ------------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return torch.nn.functional.mse_loss(x, y)


def sample(step: int, index: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 100_003 + index)
    return torch.randn(hidden, generator=g), torch.rand(hidden, generator=g) - 0.5


def digest(obj, h=None) -> str:
    """sha256 over the tensors and numbers of a nested state (other objects skipped)."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            digest(v, h)
    elif isinstance(obj, (int, float, bool)):
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


class TanhLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def build_engine(a: dict, world: int):
    """a["zero"] is a ZeRO stage, or "pp": a 2-stage PipelineModule (ZeRO-1) over `world` ranks."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    torch.manual_seed(1234)
    if a["zero"] == "pp":
        layers = [TanhLinear(a["hidden"], a["hidden"]) for _ in range(a["layers"])]
        model = PipelineModule(layers=layers, num_stages=2, loss_fn=torch.nn.functional.mse_loss,
                               partition_method="uniform")
        stage, dp = 1, world // 2
    else:
        model = Toy(a["hidden"], a["layers"])
        stage, dp = a["zero"], world
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    cfg = {"train_batch_size": a["global_batch"], "train_micro_batch_size_per_gpu": a["micro"],
           "gradient_accumulation_steps": a["global_batch"] // (a["micro"] * dp),
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def train_step(engine, step: int, a: dict, rank: int, world: int) -> str:
    """One optimizer step; returns the global mean loss (all ranks, all micro batches) as hex."""
    gas = engine.gradient_accumulation_steps()
    if a["zero"] == "pp":  # dp == 1 here: every micro batch is the global sample order
        micro = [tuple(torch.stack(t) for t in zip(*(sample(step, m * a["micro"] + i, a["hidden"])
                                                     for i in range(a["micro"])))) for m in range(gas)]
        return float(engine.train_batch(iter(micro))).hex()
    total = torch.zeros(())
    for micro in range(gas):
        first = (micro * world + rank) * a["micro"]  # global sample index of this micro batch
        xs, ys = zip(*(sample(step, first + i, a["hidden"]) for i in range(a["micro"])))
        loss = engine(torch.stack(xs), torch.stack(ys))
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    if world > 1:
        torch.distributed.all_reduce(total)
    return float(total / (gas * world)).hex()


def full_weights(engine) -> str:
    """Digest of the whole model's weights (this rank's stage for a pipeline)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return digest({n: p.data.clone() for n, p in engine.module.named_parameters()})
    return digest(engine.module.state_dict())


def local_state(engine) -> str:
    return digest([engine.module.state_dict(), engine.optimizer.state_dict()])


def scenario(a: dict, rank: int, world: int) -> dict:
    """Train to a["steps"] (resuming first if asked), saving at a["save_at"] (or every step)."""
    from megalm.engine import checkpoint_engine
    from megalm.checkpoint.layout import CheckpointError
    from megalm.engine.checkpointing import DeepSpeedCheckpointManager
    from megalm.errors import UserError

    engine = build_engine(a, world)
    mgr = DeepSpeedCheckpointManager(CheckpointConfig(dir=a["dir"], keep_last=a.get("keep_last", 3),
                                             async_save=a.get("async", False)),
                            rank=rank, world_size=world)
    twin = None
    if a.get("twin_dir"):  # the same saves again, through the other (sync/async) path
        twin = DeepSpeedCheckpointManager(CheckpointConfig(dir=a["twin_dir"], async_save=not a.get("async", False)),
                                 rank=rank, world_size=world)
    rec: dict = {"losses": {}, "at_save": {}, "weights_at_save": {}, "blocked_s": {}}
    start = 0
    if a.get("resume"):
        cs = mgr.load(engine)
        if cs is not None:
            start = cs["step"]
            rec.update(loaded_step=start, client_state=cs)
            if not a.get("light"):
                rec.update(after_load=local_state(engine), weights_after_load=full_weights(engine))
        print(f"RESUMED {start if cs is not None else 'none'}", flush=True)
    gate = threading.Event()
    real_write = checkpoint_engine.MegalmCheckpointEngine.write_pending
    real_write_one = checkpoint_engine.MegalmCheckpointEngine.write_one
    if a.get("block_writer"):
        # Hold the background writer until training has gone on: proves the loop is not blocked.
        def held(self, pending):
            if pending:  # only the async saves queue anything
                gate.wait()
            return real_write(self, pending)
        checkpoint_engine.MegalmCheckpointEngine.write_pending = held
    try:
        for step in range(start + 1, a["steps"] + 1):
            rec["losses"][step] = train_step(engine, step, a, rank, world)
            if a.get("light"):
                print(f"LOSS {step} {rec['losses'][step]}", flush=True)
            if a.get("block_writer") and step > min(a["save_at"]):
                rec.setdefault("steps_while_held", []).append(step)
                gate.set()
            if step in a.get("save_at", []) or a.get("save_every"):
                if not a.get("light"):  # the kill trials skip the hashing: saves must dominate
                    rec["at_save"][step] = local_state(engine)
                    rec["weights_at_save"][step] = full_weights(engine)
                print(f"SAVE_BEGIN {step}", flush=True)
                fail_at = a.get("fail_at", {}).get(str(a["zero"]))  # stage -> [step, rank]
                fail = fail_at == [step, rank]
                if fail:  # this rank's disk "fills up" during this save
                    def broken(self, path, rel, state):
                        raise OSError(28, "No space left on device")
                    checkpoint_engine.MegalmCheckpointEngine.write_one = broken
                try:
                    mgr.save(engine, step, {"step": step, "note": a.get("note", "")})
                    if fail_at:
                        mgr.wait()  # an async failure surfaces here
                except (CheckpointError, UserError) as exc:  # UserError: DiskFullError
                    rec.setdefault("save_errors", {})[step] = str(exc)
                finally:
                    checkpoint_engine.MegalmCheckpointEngine.write_one = real_write_one
                rec["blocked_s"][step] = mgr.last_blocked_s
                print(f"SAVE_RETURNED {step}", flush=True)
                if a.get("block_writer"):
                    rec.setdefault("published_while_held", {})[step] = os.path.isdir(
                        os.path.join(a["dir"], f"step_{step:08d}"))
                if twin is not None:
                    twin.save(engine, step, {"step": step, "note": a.get("note", "")})
        gate.set()
        mgr.wait()
        if twin is not None:
            twin.wait()
    finally:
        gate.set()
        checkpoint_engine.MegalmCheckpointEngine.write_pending = real_write
        mgr.close()
        if twin is not None:
            twin.close()
    rec["final_weights"] = full_weights(engine)
    rec["final_state"] = local_state(engine)
    return rec


def run(a: dict) -> None:
    """a["stages"] (default [a["zero"]]): run the scenario once per ZeRO stage, in dir/<stage>."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = {}
    for z in a.get("stages", [a["zero"]]):
        sa = dict(a, zero=z)
        if "stages" in a:
            sa["dir"] = os.path.join(a["dir"], str(z))
            if a.get("twin_dir"):
                sa["twin_dir"] = os.path.join(a["twin_dir"], str(z))
        out[str(z)] = scenario(sa, rank, world)
        if a.get("reload"):  # a fresh engine resumes what was just saved and trains to the end
            out[f"{z}/reload"] = scenario(dict(sa, resume=True, save_at=[], twin_dir=None,
                                               block_writer=False), rank, world)
    rec = out if "stages" in a else out[str(a["zero"])]
    with open(f"{a['out']}.{rank}.json", "w") as f:
        json.dump(rec, f)
    print("DONE", flush=True)


# ------------------------------------------------------------------------------------------------
# Launch helpers used by the tests and the stress script
# ------------------------------------------------------------------------------------------------
def toy_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_cmd(args: dict, nproc: int) -> list[str]:
    blob = json.dumps(args)
    if nproc == 1:
        return [sys.executable, HERE, blob]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", HERE, blob]


def defaults(**kw) -> dict:
    a = {"hidden": 32, "layers": 3, "micro": 2, "global_batch": 4, "zero": 0, "steps": 4}
    a.update(kw)
    return a


def run_toy(args: dict, nproc: int = 1, timeout: float = 300) -> tuple[list[dict], str]:
    """Run the toy program to completion; return (per-rank records, combined output)."""
    import subprocess

    proc = subprocess.run(toy_cmd(args, nproc), env=toy_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    recs = []
    for r in range(nproc):
        with open(f"{args['out']}.{r}.json") as f:
            recs.append(json.load(f))
    return recs, out


def _single_rank_env() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


if __name__ == "__main__":
    _single_rank_env()
    run(json.loads(sys.argv[1]))
