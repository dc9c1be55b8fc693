"""Trainer callbacks (checkpointing, early stopping, progress, LR monitor)."""
