"""Reading side of the data: shard manifests -> packed, blended, data-parallel micro batches.

    loader = build_loader(DataConfig(paths=[...], seq_len=2048), global_batch=512, micro_batch=4,
                          dp_rank=rank, dp_world=world)
    for micro_batches in loader:   # one optimizer step
        ...
    loader.state_dict() / loader.load_state_dict(sd) / loader.skip(n_steps)
"""

from megalm.data.batch import IGNORE_INDEX, collate
from megalm.data.blend import BlendIndex
from megalm.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_loader
from megalm.data.manifest import Manifest, load_manifest
from megalm.data.packed import PackedDataset, Window
from megalm.data.shards import DocIndex, open_split
from megalm.data.sources import DataConfig, Sources

__all__ = [
    "IGNORE_INDEX",
    "BlendIndex",
    "DataConfig",
    "DocIndex",
    "EvalLoader",
    "Manifest",
    "PackedDataset",
    "Sources",
    "TrainLoader",
    "Window",
    "build_eval_loader",
    "build_loader",
    "collate",
    "load_manifest",
    "open_split",
]
