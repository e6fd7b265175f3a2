"""Scale-out: the FSDP2 strategy and what sharded weights need
(:mod:`~capo_lightning.scale.parallel`)."""
