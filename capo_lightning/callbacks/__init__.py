"""Callbacks: they observe and record; nothing essential to training lives here."""

from capo_lightning.callbacks.checkpoint import InterruptCheckpoint

__all__ = ["InterruptCheckpoint"]
