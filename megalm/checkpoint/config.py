"""The `checkpoint:` section of a training config, which is also CheckpointManager's config."""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import Invalid, Section


@dataclass
class CheckpointConfig(Section):
    dir: str = ""  # checkpoint root; "" = the trainer's default, runs/<name>/checkpoints
    interval: int = 1000  # optimizer steps between saves (and always at the end)
    keep_last: int = 3  # published checkpoints kept; older ones deleted after a newer publish
    async_save: bool = False  # write + publish in a background thread
    # Start from these weights only (a checkpoint folder, root, run dir, or `megalm import-hf`
    # output): fresh optimizer, step and data position. A resumable checkpoint of this run wins.
    init_from: str = ""

    def validate(self) -> None:
        # Also built directly (CheckpointManager's callers), so the types are checked here too.
        if not isinstance(self.dir, str):
            raise Invalid("dir", f"expected a path, got {self.dir!r}")
        for key in ("interval", "keep_last"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Invalid(key, f"expected an integer >= 1, got {value!r}")
        if not isinstance(self.init_from, str):
            raise Invalid("init_from", f"expected a checkpoint path, got {self.init_from!r}")
        if not isinstance(self.async_save, bool):
            raise Invalid("async_save", f"expected true or false, got {self.async_save!r}")
