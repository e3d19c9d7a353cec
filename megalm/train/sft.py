"""`task: sft`: supervised finetuning on `megalm prep --sft` shards with the one Trainer.

The model and loss are the LM's: batches (megalm/data/sft.py) carry `labels = -100` on prompt and
template tokens, which the fused cross-entropy ignores, and `doc_ids`/`position_ids` that keep
packed examples apart. Start from pretrained weights with `checkpoint.init_from`; with
`lora.rank > 0` only LoRA adapters train (megalm/models/lora.py) and every checkpoint also holds
them alone (`adapter.safetensors` + `adapter_config.json`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn as nn

from megalm.engine.runtime import gathered
from megalm.export.shards import safetensors_bytes
from megalm.models.lora import LoraConfig, apply_lora, is_adapter
from megalm.train.task import LMTask, TaskHook

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class SFTTask(LMTask):
    name = "sft"
    shard_kind = "sft"

    def build_model(self) -> nn.Module:
        model = super().build_model()  # the plain LLM, with init_from's weights when set
        if self.cfg.lora.enabled:
            apply_lora(model, self.cfg.lora)
        return model

    def build_loader(self, split: str, dp_rank: int, dp_world: int) -> Any:
        loader = super().build_loader(split, dp_rank, dp_world)
        cut = sum(ds.truncated for ds in loader.sources.datasets)
        if cut and dp_rank == 0:
            print(f"warning: {cut} {split} examples are longer than data.seq_len={self.cfg.data.seq_len}; "
                  f"they keep their first {self.cfg.data.seq_len + 1} tokens (raise data.seq_len to train on "
                  f"all of them)", file=sys.stderr, flush=True)
        return loader

    def fingerprint(self) -> dict[str, Any]:
        fp = {**super().fingerprint(), "task": "sft", "chat_template": self._chat_template()}
        if self.cfg.lora.enabled:
            fp["lora"] = self.cfg.lora.to_dict()  # load_model / init_from merge the adapters with it
        if self.cfg.checkpoint.init_from:
            fp["init_from"] = os.path.abspath(self.cfg.checkpoint.init_from)
        return fp

    def _chat_template(self) -> dict[str, str] | None:
        """The first shard dir's template (`megalm sample --chat` renders prompts with it)."""
        with open(os.path.join(self.cfg.data.paths[0], "manifest.json")) as f:
            return json.load(f).get("sft", {}).get("template")

    def attach(self, engine: Any, dp_rank: int, dp_world: int) -> TaskHook:
        return AdapterHook(self, engine) if self.cfg.lora.enabled else TaskHook()


class AdapterHook(TaskHook):
    """Writes the adapters alone into every checkpoint; no state of its own to carry."""

    def __init__(self, task: SFTTask, engine: Any):
        self.task, self.engine = task, engine

    def checkpoint_files(self) -> dict[str, bytes]:
        """Collective (ZeRO-3 gathers each adapter in turn): {file name: bytes} for the checkpoint."""
        zero3 = self.task.cfg.parallel.zero_stage == 3
        adapters = {}
        for name, p in self.engine.module.named_parameters():
            if not is_adapter(name):
                continue
            with gathered([p], zero3):
                adapters[name] = p.detach().float().cpu().clone()
        fp = self.task.fingerprint()
        base = {"model_config": fp["model_config"], "tokenizer_sha256": fp["tokenizer_sha256"],
                "init_from": fp.get("init_from")}
        return adapter_files(adapters, self.task.cfg.lora, base)


def adapter_files(adapters: dict[str, torch.Tensor], lora: LoraConfig, base: dict[str, Any]) -> dict[str, bytes]:
    """{file name: bytes} of the adapters alone: `adapter.safetensors` (fp32, megalm names) and
    `adapter_config.json` (the LoRA settings and the base model they apply to)."""
    config = {"format": "megalm-lora", "format_version": 1, **lora.to_dict(), "scale": lora.scale,
              "base_model": base}
    return {ADAPTER_WEIGHTS: safetensors_bytes([(k, v.detach().float().cpu()) for k, v in adapters.items()],
                                               {"format": "pt", "megalm": "lora"}),
            ADAPTER_CONFIG: (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()}
