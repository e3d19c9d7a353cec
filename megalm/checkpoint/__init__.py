"""Checkpoints of a training run, engine-agnostic: the names in a checkpoint root, durable files
and manifests, the run lock, free space, the resume policy, the unpickle allowlist, picking and
verifying a published checkpoint (reader), and the manager (save/publish/prune/load, disk-full
handling). What the training engine writes inside a checkpoint is megalm.engine's.

Import the manager and reader from their modules (`megalm.checkpoint.manager`,
`megalm.checkpoint.reader`): this package's import stays light (the training config imports
`megalm.checkpoint.config` before torch is needed).
"""

from megalm.checkpoint.config import CheckpointConfig
from megalm.checkpoint.layout import CheckpointError, published_tags, tag_for

__all__ = ["CheckpointConfig", "CheckpointError", "published_tags", "tag_for"]
