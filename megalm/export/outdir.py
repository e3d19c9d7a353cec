"""An output folder that appears whole or not at all.

Everything is written into `.tmp-<name>-<pid>` next to the destination (same filesystem, so the
final rename is atomic), fsynced, then renamed onto the destination. On any error the temporary
folder is deleted: no partial export or import is ever left under the destination's name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from megalm.checkpoint.files import fsync_tree, list_files
from megalm.errors import UserError
from megalm.fsio import fsync_dir


def check_destination(out: str, overwrite: bool, flag: str = "--out") -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
        raise UserError(f"{flag} {out}: already exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    try:  # like save_pretrained: missing parent folders are made
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot create the parent folder {parent} ({e.strerror})") from None
    return out


@contextlib.contextmanager
def staged_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder; on normal exit it replaces `out` (see module doc)."""
    out = check_destination(out, overwrite)
    parent, name = os.path.split(out)
    work = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        yield work
        fsync_tree(work, list_files(work))
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".tmp-old-{name}-{os.getpid()}")
            os.rename(out, old)
        os.rename(work, out)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
