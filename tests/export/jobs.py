"""Checkpoints to export, trained on 2 real gloo ranks (run by tests.distributed.helper)."""

from __future__ import annotations

import os
from typing import Any

from tests.distributed.jobs import MODES, small_overrides, train

# ZeRO-3 with an untied head; a 2-stage pipeline with tied embeddings (the head's copy of the
# embedding lives on the last stage).
LAYOUTS: dict[str, list[str]] = {
    "zero3": MODES["zero3"],
    "pp2": MODES["pp2"] + ["model.tie_embeddings=true"],
}


def make_checkpoints(workdir: str, shards: str) -> dict[str, Any]:
    os.chdir(workdir)
    return {name: os.path.abspath(train(small_overrides(shards, name, steps=2) + extra)["run_dir"])
            for name, extra in LAYOUTS.items()}
