"""megalm: pretrain and finetune decoder LMs and diffusion models with DeepSpeed."""

from pathlib import Path

__version__ = "0.1.0"

# Example run configs and, under models/, the model presets: package data, so an installed wheel
# has them too (the checkout's top-level `configs/` is a link to this folder).
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
