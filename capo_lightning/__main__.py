"""``python -m capo_lightning`` is the ``capo`` command."""

from capo_lightning.cli import main

main()
