"""Checkpoints of a training run: layout, durable files, the DeepSpeed adapter, universal
conversion, the manager (save/publish/prune/load, run lock, disk-full handling) and the one reader.

Import the manager and reader from their modules (`megalm.checkpoint.manager`,
`megalm.checkpoint.reader`): this package's import stays light (the training config imports
`megalm.checkpoint.config` before torch or DeepSpeed are needed).
"""

from megalm.checkpoint.config import CheckpointConfig
from megalm.checkpoint.layout import CheckpointError, published_tags, tag_for

__all__ = ["CheckpointConfig", "CheckpointError", "published_tags", "tag_for"]
