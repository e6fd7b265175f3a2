"""The tiny random test model: a ~100 k-parameter Qwen2 with a locally trained byte-level BPE
tokenizer.

Built in ~0.2 s with no download, so every CPU test can run a real transformers model end to end.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

__all__ = ["build_tiny_model"]

_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Builds a tiny random Qwen2 causal LM plus tokenizer and saves both to `out_dir`.

    The byte-level BPE tokenizer (trained in ~0.05 s on synthetic arithmetic chat text) does not
    depend on `seed`, so all tiny models share one vocabulary. ChatML chat template; eos <|im_end|>,
    pad <pad>; generation stops at <|im_end|> or <|endoftext|>. Weights are drawn after
    `torch.manual_seed(seed)`: same arguments, same weights.

    Args:
        out_dir: Directory to write (created if needed).
        seed: Seed of the weight initialisation.
        vocab_size: BPE vocabulary size, specials included (the corpus supports up to ~530).
        hidden_size: Model width d; the MLP is 2 d wide.
        num_layers: Number of decoder layers.

    Returns:
        `out_dir` as a Path.
    """
    out = Path(out_dir)
    tokenizer = _train_tiny_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _tiny_corpus(n_lines: int = 3000) -> list[str]:
    """Synthetic arithmetic chat text. Fixed seed: every tiny model gets the same tokenizer."""
    rng = random.Random(1234)
    ops = [
        ("+", "plus", lambda a, b: a + b),
        ("-", "minus", lambda a, b: a - b),
        ("*", "times", lambda a, b: a * b),
    ]
    questions = [
        "What is {a} {s} {b}?",
        "What is {a}{s}{b}? Answer with a number.",
        "Compute {a} {w} {b}.",
        "Calculate the sum of {a} and {b}.",
        "Find the value of {a} {s} {b}. Put the final answer in a box.",
        "{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
        "There are {a} {o} in each box and {b} boxes. How many {o} are there in total?",
    ]
    answers = [
        "The answer is \\boxed{{{r}}}.",
        "{a} {s} {b} = {r}",
        "Let me think step by step. So the answer is {r}.",
        "First, we compute {a} {w} {b}, which equals {r}. Therefore the result is \\boxed{{{r}}}.",
        "{n} now has {r} {o}. Final answer: {r}",
    ]
    names = "Alice Bob Carol David Emma Frank Grace Henry Maria Tom Lily Sam Nora Omar".split()
    objects = (
        "apples books coins marbles pencils cookies stickers flowers cards eggs oranges "
        "bottles stamps"
    ).split()
    lines = []
    for _ in range(n_lines // 2):
        s, w, fn = rng.choice(ops)
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        fields = {
            "a": a,
            "b": b,
            "s": s,
            "w": w,
            "r": fn(a, b),
            "n": rng.choice(names),
            "o": rng.choice(objects),
        }
        role = rng.choice(["system", "user", "assistant"])
        lines.append(f"<|im_start|>{role}\n" + rng.choice(questions).format(**fields))
        lines.append(rng.choice(answers).format(**fields) + "<|im_end|>")
    return lines


def _train_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains byte-level BPE and wraps it with a ChatML template.

    The pipeline (NFC, Qwen2 split regex: one digit per token, then byte-level) is exactly
    Qwen2Tokenizer's, because AutoTokenizer always rebuilds a `model_type: qwen2` tokenizer as
    Qwen2Tokenizer (and so does vLLM); any other pipeline would tokenize differently after a reload.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet
    )
    trainer.show_progress = False
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
        model_max_length=512,
    )
