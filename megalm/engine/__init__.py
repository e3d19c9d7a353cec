"""The one boundary to DeepSpeed: no other module of megalm imports it (tests/engine/test_boundary.py).

  version.py           the tested DeepSpeed range, checked before first use
  config.py            the DeepSpeed JSON config, generated from a TrainConfig
  runtime.py           process group, deepspeed.initialize (plain or pipeline), ZeRO-3 gathering,
                       the guard's gradient norm inside ZeRO
  muon.py              DeepSpeed's Muon optimizer, guarded, its Newton–Schulz routed to megalm.ops
  checkpoint_engine.py the CheckpointEngine that writes DeepSpeed's files durably (or async)
  checkpointing.py     DeepSpeed's side of megalm.checkpoint's save/load protocol
  universal.py         conversion to a universal checkpoint when the data-parallel size changes
  muon_universal.py    Muon's momentum through that conversion
  sequence.py          Ulysses sequence parallelism: DeepSpeed's DistributedAttention around the
                       model's attention cores (not yet a `megalm train` option)
  layout.py            the one decoder of DeepSpeed's files in a checkpoint (client state, every
                       model tensor from ZeRO 0-3 and pipeline layouts), for resume, sample, export

Importing this package (or config.py, layout.py, version.py) does not import DeepSpeed: the
modules import it inside the functions that call it, so `megalm export` and config validation
start in a fraction of DeepSpeed's import time.
"""
