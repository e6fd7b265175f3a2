"""``python -m capo_lightning`` is the ``capo`` command."""

from capo_lightning.commands.cli import main

main()
