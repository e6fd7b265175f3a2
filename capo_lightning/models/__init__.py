"""Models this package can put on disk without the Hub: the tiny random test model (:mod:`~.tiny`) and
the bundled SmolLM2-135M-Instruct (:mod:`~.bundled`). :mod:`capo_lightning.policy` resolves names to them."""
