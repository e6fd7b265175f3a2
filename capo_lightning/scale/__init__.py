"""Scale-out: the FSDP2 strategy and what sharded weights need
(:mod:`~capo_lightning.scale.parallel`); what the processes of one launch agree on
(:mod:`~capo_lightning.scale.launch`)."""
