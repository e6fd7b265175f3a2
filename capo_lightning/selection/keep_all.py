"""The "none" selector."""

from __future__ import annotations

import torch

from capo_lightning.selection.base import Selection, Selector, TokenView


class KeepAll(Selector):
    """Keeps every token: the loss with it is bit-identical to the loss with no selector."""

    def forward(self, view: TokenView) -> Selection:
        """All-True mask of the response shape; reports a rejection rate of 0."""
        mask = torch.ones_like(view.response_mask, dtype=torch.bool)  # [N, L]
        metrics = {"select/token_reject_rate": torch.zeros((), dtype=torch.float32)}
        return Selection(token_mask=mask, judged=view.response_mask, metrics=metrics)
