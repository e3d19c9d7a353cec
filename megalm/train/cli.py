"""`megalm train CONFIG.yaml [key=value ...] [--resume auto|none|PATH]`.

Run it under any launcher (`megalm launch --nproc N --`, torchrun, mpirun, srun); with none it
trains as a single rank.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from launcher.env import discover, set_accelerator_default
from launcher.stopfile import note_checkpointed_stop
from megalm.cliparse import Parser
from megalm.train.config import load_config
from megalm.train.metrics import json_safe


def _parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="megalm train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file, or the name of a shipped example (demo, gpt2-124m)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.micro_batch=2 data.paths=[d]")
    p.add_argument("--resume", default="auto",
                   help="auto: newest valid checkpoint in checkpoint.dir if any; none: start fresh; "
                        "PATH: that checkpoint directory")
    return p.parse_args(argv)


def main(argv: list[str], teardown: bool = True) -> int:
    """`teardown=False`: the process exits right after (megalm.cli.leave), so the process group is
    left as it is after the last barrier instead of destroyed."""
    args = _parse(argv)
    # Validate everything we can before any process group exists (errors are one line).
    cfg = load_config(args.config, args.overrides, world_size=discover().world_size)
    cfg.validate_accelerator(set_accelerator_default())
    # DeepSpeed fixes its accelerator when first imported, and these import it: only after the
    # line above has chosen (CUDA if visible, else CPU).
    from megalm.engine.runtime import init_distributed
    from megalm.train.loop import Trainer
    from megalm.train.task import build_task

    task = build_task(cfg)
    rank, world = init_distributed()
    trainer = Trainer(cfg, task, rank=rank, world_size=world)
    trainer.resume(args.resume)
    summary = trainer.run()
    if summary["stopped_by_signal"] and not summary["finished"]:
        note_checkpointed_stop(rank, summary["stopped_by_signal"], summary["step"])  # -> sbatch requeues
    if rank == 0:
        print(json.dumps(json_safe(summary)), flush=True)
    dist.barrier()
    if teardown:
        dist.destroy_process_group()
    if summary["stopped_by_signal"] and not summary["finished"]:
        return 128 + summary["stopped_by_signal"]  # checkpointed; the scheduler may requeue us
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
