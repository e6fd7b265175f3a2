"""``capo report``: the paper's figures and a ``summary.json`` from the CSV logs of ``capo fit``
runs.

Reads only files (``metrics.csv`` and the ``config.yaml`` LightningCLI saved next to it) and imports
nothing else of the package, so it runs where training does not.
"""

from capo_lightning.report.command import build_report, main

__all__ = ["build_report", "main"]
