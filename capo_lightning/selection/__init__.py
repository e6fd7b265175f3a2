"""Token selectors. Short names here work on the CLI: ``--model.selector=KeepAll``.

The package is ``selection``, not ``selectors``: ``selectors`` is a stdlib module that asyncio
imports.
"""

from capo_lightning.selection.base import Selection, Selector, TokenView, keep_out_of_ddp_broadcasts
from capo_lightning.selection.capo import CAPOSelector
from capo_lightning.selection.keep_all import KeepAll

__all__ = [
    "CAPOSelector",
    "KeepAll",
    "Selection",
    "Selector",
    "TokenView",
    "keep_out_of_ddp_broadcasts",
]
