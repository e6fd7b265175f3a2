"""Where a training rank's GPU memory goes, per component, for the paper's models (docs/scaling.md's table).

An estimate from the shapes alone (no download): Qwen2.5-Math-1.5B and -7B as their config.json give them,
FSDP2 full sharding with fp32 master weights, fp32 gradients and AdamW moments, bf16 compute, activation
checkpointing at decoder-layer boundaries, fp32 logits over the response, the CAPO selector's gathered LM
head and shadow Adam. Not counted: the CUDA context (~0.5-1 GB), NCCL buffers, allocator fragmentation,
and vLLM, which sleeps (weights and KV cache released) while the trainer runs.
    .venv/bin/python scripts/memory_estimate.py
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


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


def components(shape: Shape, ranks: int, micro: int, response: int, total: int, capo: bool) -> dict[str, float]:
    """GB per rank at the peak of a training micro-step (backward of the last layer)."""
    p, d, v = shape.params, shape.hidden, shape.vocab
    root = v * d * (1 if shape.tied else 2)  # embeddings (+ head): the root FSDP unit, gathered in bf16
    out = {
        "fp32 weights + grads, / ranks": 8 * p / ranks,
        "AdamW moments, / ranks": 8 * p / ranks,
        # FSDP2: the root unit and a layer (+ the next one, prefetched) gathered in bf16; one GPU under
        # bf16-mixed: autocast's bf16 copies of every weight
        "bf16 weights in use": 2 * (root + 2 * shape.layer_params) if ranks > 1 else 2 * p,
        "checkpointed activations": 2 * micro * total * d * shape.layers,  # bf16 layer inputs
        "one layer recomputed": 2 * micro * total * (6 * d + 3 * shape.intermediate),
        # fp32 logits over the response, their log-softmax, the softmax of the entropy, and their gradient
        "logits: 4 fp32 [micro, response, V]": 4 * 4 * micro * response * v,
    }
    if capo:
        out["CAPO: full LM head + shadow Adam (fp32)"] = 3 * 4 * v * d
    return {key: value / GB for key, value in out.items()}


def table(ranks: int = 4, micro: int = 4, response: int = 1024, total: int = 1536) -> str:
    """Markdown: one column per (model, selector), one row per component, the total last."""
    columns = [(shape, capo) for shape in MODELS for capo in (False, True)]
    heads = [f"{s.name} ({s.params / 1e9:.2f} B){' + CAPO' if capo else ''}" for s, capo in columns]
    values = [components(s, ranks, micro, response, total, capo) for s, capo in columns]
    keys = list(values[-1])
    lines = ["| GB per rank | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{v.get(key, 0.0):.1f}" for v in values) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(v.values()):.1f}**" for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("FSDP2 over 4 GPUs, micro-batch 4, prompt 512 + response 1024 tokens:\n")
    print(table())
    print("\nOne GPU, no sharding, bf16-mixed, micro-batch 8 (measured on an H200 for 1.5B, KeepAll: peak 48 GiB):\n")
    print(table(ranks=1, micro=8))
