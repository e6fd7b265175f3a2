"""Where a training rank's GPU memory goes, per component, for the paper's models (docs/scaling.md's table).

An estimate from the shapes alone (no download): Qwen2.5-Math-1.5B and -7B as their config.json give them.
What it counts, in bytes, at the peak of a training micro-step's backward:
- persistent: fp32 master weights and gradients and AdamW's two fp32 moments (divided over the ranks under
  FSDP2 full sharding); the bf16 weights in use (FSDP2: the root unit, embeddings and head, plus two gathered
  decoder layers, the one computing and the one prefetched; one GPU under bf16-mixed: autocast's bf16 copy
  of every weight); the checkpointed activations (bf16 input of every decoder layer); CAPO's selector state
  (the gathered LM head and its shadow Adam, fp32, replicated on every rank);
- transient, never alive together, so the peak adds only the larger of the two: one decoder layer's
  recomputed activations, and the memory-bounded LM head's backward (capo_lightning/models/lm_head.py). The
  head never builds [n, L, V] logits: it walks the tokens in chunks of ``head_chunk`` = 2**27 // V tokens, one
  fp32 [chunk, V] block (~0.5 GB) at a time. Read from its backward: while the next chunk's logits are formed,
  the previous block (fp32), its bf16 copy, the new bf16 product and its fp32 read are alive (12 bytes per
  block element), beside the fp32 weight-gradient accumulator [V, d]; with fp32 weights (one GPU, bf16-mixed)
  also the head's bf16 copy and its per-chunk recast (2 x 2 bytes per head element); with bf16 weights (FSDP2)
  the accumulator's bf16 cast at the end (6 bytes of blocks and 6 of head per element then). The head's forward
  (14 bytes per block element, no accumulator) stays below its backward at these shapes.
Not counted: the CUDA context (~0.5-1 GB), NCCL buffers, allocator fragmentation and caching, the saved head
input and log-normalisers ([tokens, d] and [tokens]: tens of MB), the temporaries of the loss and the selector,
and vLLM, which sleeps (weights and KV cache released) while the trainer runs. On one GPU autocast's bf16
copies are counted for every weight although a checkpointed backward holds fewer at a time.
    .venv/bin/python scripts/memory_estimate.py
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
LOGIT_BUDGET = 2**27  # capo_lightning.models.lm_head.LOGIT_BUDGET["cuda"]: elements of one [chunk, V] block
TRANSIENT = ("one layer recomputed (transient)", "LM head backward, chunked (transient)")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value width: kv heads x head dim
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        d = self.hidden
        attention = 2 * d * d + 2 * d * self.kv_dim + d + 2 * self.kv_dim  # q, o; k, v; q/k/v biases
        return attention + 3 * d * self.intermediate + 2 * d  # gate, up, down; two RMSNorms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden


MODELS = (
    Shape("Qwen2.5-Math-1.5B", 1536, 8960, 28, 256, 151936, tied=True),
    Shape("Qwen2.5-Math-7B", 3584, 18944, 28, 512, 152064, tied=False),
)


def head_backward(shape: Shape, tokens: int, fp32_weights: bool) -> float:
    """Bytes alive at the peak of the chunked LM head's backward over ``tokens`` response tokens."""
    v, d = shape.vocab, shape.hidden
    block = min(tokens, max(1, LOGIT_BUDGET // v)) * v  # elements of one [chunk, V] block
    head = v * d
    if fp32_weights:  # the bf16 copy w and _logits' per-chunk recast, beside the fp32 accumulator
        return 12 * block + 4 * head + 2 * 2 * head
    return max(12 * block + 4 * head, 6 * block + 6 * head)  # forming a block; returning the bf16 gradient


def components(shape: Shape, ranks: int, micro: int, response: int, total: int, capo: bool) -> dict[str, float]:
    """GB per rank, one entry per component; the peak is :func:`peak` of them."""
    p, d, v = shape.params, shape.hidden, shape.vocab
    root = v * d * (1 if shape.tied else 2)  # embeddings (+ head): the root FSDP unit, gathered in bf16
    out = {
        "fp32 weights + grads, / ranks": 8 * p / ranks,
        "AdamW moments, / ranks": 8 * p / ranks,
        # FSDP2: the root unit and a layer (+ the next one, prefetched) gathered in bf16; one GPU under
        # bf16-mixed: autocast's bf16 copies of every weight
        "bf16 weights in use": 2 * (root + 2 * shape.layer_params) if ranks > 1 else 2 * p,
        "checkpointed activations": 2 * micro * total * d * shape.layers,  # bf16 layer inputs
        TRANSIENT[0]: 2 * micro * total * (6 * d + 3 * shape.intermediate),
        TRANSIENT[1]: head_backward(shape, micro * response, fp32_weights=ranks == 1),
    }
    if capo:
        out["CAPO: full LM head + shadow Adam (fp32)"] = 3 * 4 * v * d
    return {key: value / GB for key, value in out.items()}


def peak(values: dict[str, float]) -> float:
    """The persistent components plus the larger of the transient ones (they are never alive together)."""
    return sum(v for k, v in values.items() if k not in TRANSIENT) + max(values.get(k, 0.0) for k in TRANSIENT)


def table(ranks: int = 4, micro: int = 4, response: int = 1024, total: int = 1536) -> str:
    """Markdown: one column per (model, selector), one row per component, the peak last."""
    columns = [(shape, capo) for shape in MODELS for capo in (False, True)]
    heads = [f"{s.name} ({s.params / 1e9:.2f} B){' + CAPO' if capo else ''}" for s, capo in columns]
    values = [components(s, ranks, micro, response, total, capo) for s, capo in columns]
    keys = list(values[-1])
    lines = ["| GB per rank | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{v.get(key, 0.0):.1f}" for v in values) + " |")
    peaks = " | ".join(f"**{peak(v):.1f}**" for v in values)
    lines.append(f"| **peak**: the rest + the larger transient | {peaks} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("FSDP2 over 4 GPUs, micro-batch 4, prompt 512 + response 1024 tokens:\n")
    print(table())
    print("\nOne GPU, no sharding, bf16-mixed (fp32 weights), micro-batch 8:\n")
    print(table(ranks=1, micro=8))
