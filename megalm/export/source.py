"""Stream a language-model checkpoint's tensors, one at a time, from any layout megalm trains with.

    src = CheckpointTensors("runs/demo/checkpoints")
    for name, tensor in src.items():    # the model's state-dict names and order, fp32 master weights
        ...

The decoding of the files is megalm.engine.layout's (StateTensors); this adds what export needs
around it: resolving and verifying the path (every file's sha256 and the unpickle allowlist), the
run's LLMConfig, and the model's pipeline layer list for a pipeline checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megalm.engine import layout
from megalm.engine.layout import Item, StateTensors
from megalm.errors import UserError
from megalm.models.config import LLMConfig
from megalm.models.llm import LLM
from megalm.models.pipeline import pipeline_layers

__all__ = ["CheckpointTensors", "Item"]


class CheckpointTensors(StateTensors):
    """The model tensors of one verified LM checkpoint (a step folder, checkpoint root or run dir)."""

    def __init__(self, checkpoint: str, release_bytes: int = 128 << 20,
                 build_model: Callable[[LLMConfig], torch.nn.Module] | None = None):
        tag_dir, meta = layout.read_client_state(checkpoint)  # verified: checksums and allowlist
        if meta.get("data", {}).get("task") == "diffusion":
            raise UserError(f"{tag_dir}: a DiT (diffusion) checkpoint: export it with --format diffusers")
        if "model_config" not in meta.get("data", {}):
            raise UserError(f"{tag_dir}: not a language-model checkpoint (no data.model_config in its client state)")
        self.config = LLMConfig.from_dict(dict(meta["data"]["model_config"]), source=f"{tag_dir}: model_config")
        build = build_model or LLM

        def pipeline_map() -> layout.PipelineMap:
            with torch.device("meta"):  # names and shapes only
                model = build(self.config)
            return layout.pipeline_map(model, pipeline_layers(model))

        super().__init__(tag_dir, meta, release_bytes, pipeline=pipeline_map)
