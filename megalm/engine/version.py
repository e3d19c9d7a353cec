"""The DeepSpeed versions megalm is tested with, checked before DeepSpeed is first used.

megalm reaches into DeepSpeed's internals in this package only (its ZeRO optimizers' gradient
dicts and norm methods, the checkpoint-engine hook, the universal converter, Muon's Newton–Schulz
name, the on-disk layout of its checkpoints). Those move between releases, so a version outside the
tested range is refused in one line instead of failing somewhere inside a step. The range is also
pyproject.toml's requirement (tests/engine/test_boundary.py keeps the two equal).
"""

from __future__ import annotations

import re
from importlib import metadata

from megalm.errors import UserError

TESTED = ((0, 19, 8), (0, 20, 0))  # [lowest tested, first untested): DeepSpeed 0.19.8 on CPU and H200
REQUIREMENT = "deepspeed>=0.19.8,<0.20"


def parse(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string; a pre-release or local tail is ignored."""
    found = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if found is None:
        raise UserError(f"DeepSpeed version {version!r}: expected major.minor.patch")
    major, minor, patch = (int(g or 0) for g in found.groups())
    return major, minor, patch


def check_deepspeed(installed: str | None = None) -> str:
    """The installed DeepSpeed version; UserError (one line) when it is missing or untested."""
    if installed is None:
        try:
            installed = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            raise UserError(f"DeepSpeed is not installed: pip install '{REQUIREMENT}'") from None
    low, high = TESTED
    if not low <= parse(installed) < high:
        raise UserError(f"DeepSpeed {installed} is outside the range megalm is tested with ({REQUIREMENT}): "
                        f"pip install '{REQUIREMENT}'")
    return installed
