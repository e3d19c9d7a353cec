"""Export megalm checkpoints for serving."""
