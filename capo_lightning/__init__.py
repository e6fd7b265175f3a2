"""capo_lightning: curvature-aware policy optimization for LLM reasoning, on PyTorch Lightning."""

__version__ = "0.1.0"
