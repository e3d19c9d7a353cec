"""megalm: pretrain and finetune decoder LMs and diffusion models with DeepSpeed."""

__version__ = "0.1.0"
