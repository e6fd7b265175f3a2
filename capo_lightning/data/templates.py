r"""Named prompt templates: how a question becomes the text the policy continues.

Select one with ``data.template`` (``chat``, ``paper``, ``eval``, ``qwen_math``, ``plain``).
Chat templates go through the tokenizer's own chat template (so the same name works for
SmolLM2, Qwen and Llama tokenizers); a tokenizer without one gets ``system + "\n\n" + user``.

* ``chat``: the question as the user turn, no system prompt (the default).
* ``paper``: the CAPO paper's training prompt (its official code, an open-r1 fork): a system prompt
  asking for reasoning inside ``<think> </think>`` and then the answer, here in ``\boxed{}``.
* ``eval``: the "Solve the following math problem ..." query of lighteval's MATH tasks, which the
  paper used for its TEST numbers, as the user turn; no system prompt.
* ``qwen_math``: Qwen2.5-Math's system prompt, "Please reason step by step, and put your final
  answer within \boxed{}."
* ``plain``: the question as is, no chat template (base models, few-shot formats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TEMPLATES", "PromptTemplate", "get_template"]


@dataclass(frozen=True)
class PromptTemplate:
    """How to format one question.

    Attributes:
        name: the config name.
        system: the system message, or None.
        user: the user turn; ``{question}`` is replaced by the question.
        chat: apply the tokenizer's chat template (with the generation prompt).
    """

    name: str
    system: str | None = None
    user: str = "{question}"
    chat: bool = True

    def format(self, question: str, tokenizer: Any, system: str | None = None) -> str:
        """The prompt text for ``question``; ``system`` overrides the template's system message."""
        system = self.system if system is None else system
        user = self.user.replace("{question}", question)
        if self.chat and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": user})
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return f"{system}\n\n{user}" if system else user


PAPER_SYSTEM = (
    "A conversation between a user and an assistant. The user asks a math question and the "
    "assistant solves it. The assistant first thinks through the reasoning step by step inside "
    "<think> </think> tags, then, after </think>, states the final answer in \\boxed{}."
)
EVAL_USER = (
    "Solve the following math problem efficiently and clearly.  The last line of your response "
    "should be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope "
    "it is correct' (without quotes) where ANSWER is just the final number or expression that "
    "solves the problem. Think step by step before answering.\n\n{question}"
)
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("chat"),
        PromptTemplate("paper", system=PAPER_SYSTEM),
        PromptTemplate("eval", user=EVAL_USER),
        PromptTemplate("qwen_math", system=QWEN_MATH_SYSTEM),
        PromptTemplate("plain", chat=False),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The template called ``name``; ValueError naming ``data.template`` and the choices
    otherwise."""
    if name not in TEMPLATES:
        raise ValueError(
            f"data.template={name!r} is not a template; choose one of {sorted(TEMPLATES)}"
        )
    return TEMPLATES[name]
