"""The "none" selector."""

from __future__ import annotations

import torch

from capo_lightning.selection.base import Selection, Selector, TokenView


class KeepAll(Selector):
    """Keeps every token: the loss with it is bit-identical to the loss with no selector."""

    def forward(self, view: TokenView) -> Selection:
        """All-True mask of the response shape; it judges every response token and rejects none."""
        mask = torch.ones_like(view.response_mask, dtype=torch.bool)  # [N, L]
        return Selection(token_mask=mask, judged=view.response_mask)
