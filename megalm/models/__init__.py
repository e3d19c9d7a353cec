"""Decoder LMs: `LLM` / `LLMConfig` (llm.py), presets (presets.py), KV-cache generation, pipeline layers."""

from megalm.models.config import LLMConfig
from megalm.models.llm import LLM
from megalm.models.presets import load_preset, preset_names

__all__ = ["LLM", "LLMConfig", "load_preset", "preset_names"]
