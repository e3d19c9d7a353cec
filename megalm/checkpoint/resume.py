"""What `--resume auto | none | PATH` means for a run whose checkpoints go to `own_dir`.

Pure policy (reads directory listings only): which directory and tag to load, or a one-line
refusal when continuing would mix two histories in one checkpoint folder.
"""

from __future__ import annotations

import os

from megalm.checkpoint.layout import TAG_RE, published_tags
from megalm.errors import UserError


def plan(own_dir: str, mode: str) -> tuple[str, str | None] | None:
    """(directory to read, tag or None for its newest valid one), or None to start fresh."""
    own_dir = os.path.abspath(own_dir)
    own = published_tags(own_dir)
    if mode == "none":
        if own:
            raise UserError(f"--resume none: {own_dir} already holds checkpoints of a run (newest {own[-1]}); use "
                            f"--resume auto to continue it, or set another checkpoint.dir (or delete that directory) "
                            f"to start fresh")
        return None
    if mode == "auto":
        return own_dir, None
    path = os.path.abspath(mode)
    parent, tag = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise UserError(f"--resume {mode}: {path} {what}; expected a checkpoint folder like "
                        f".../checkpoints/step_00000100 (or --resume auto / none)")
    if not TAG_RE.match(tag):
        raise UserError(f"--resume {mode}: expected a checkpoint folder named like step_00000100, got {tag!r} (to "
                        f"continue this run's newest checkpoint, use --resume auto)")
    if parent == own_dir and own and tag != own[-1]:
        # Saving after an older checkpoint would interleave two histories in one directory.
        raise UserError(f"--resume {mode}: {own_dir} holds newer checkpoints (newest {own[-1]}); resume from the "
                        f"newest (--resume auto), or copy {tag} into another checkpoint.dir to branch from it")
    if parent != own_dir and own:
        raise UserError(f"--resume {mode}: {own_dir} already holds checkpoints of another run (newest {own[-1]}); "
                        f"continuing from {path} there would mix two runs: set another checkpoint.dir (or delete "
                        f"that directory)")
    return parent, tag
