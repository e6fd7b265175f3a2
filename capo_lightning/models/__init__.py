"""The model side: which model to train and how one forward over it is scored.

:mod:`~.policy` resolves a model name to a folder and loads policy and tokenizer (``PolicySpec``),
with :mod:`~.lora` for LoRA adapters; :mod:`~.forward` scores sampled responses in one forward whose
LM head :mod:`~.lm_head` computes in token chunks. The models this package can put on disk without
the Hub are the tiny random test model (:mod:`~.tiny`) and the bundled SmolLM2-135M-Instruct
(:mod:`~.bundled`)."""
