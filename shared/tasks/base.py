"""What every task produces: a :class:`PromptCase` of three token segments, so that any evaluator can choose which
part is prefilled exactly and which part is decoded through a (compressed) KV cache.

    prefix_ids  chat header + long context                      (always prefilled exactly)
    query_ids   question + end of user turn + assistant header + answer prefix
    answer_ids  the gold answer tokens (teacher-forced and scored)

Decode mode (the context is compressed, the question reads the compressed cache): prefill ``prefix_ids``, decode
``query_ids + answer_ids``. Paper protocol (question inside the exact prefill): prefill ``prefix_ids + query_ids``,
decode ``answer_ids``. Lengths are always in the model's own tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_CTX, _Q = "\x00CONTEXT\x00", "\x00QUESTION\x00"


@dataclass
class PromptCase:
    task: str
    prefix_ids: list[int]
    query_ids: list[int]
    answer_ids: list[int]
    answer_text: str
    meta: dict = field(default_factory=dict)

    @property
    def context_tokens(self) -> int:
        return len(self.prefix_ids)


@dataclass(frozen=True)
class ChatFrame:
    """The model's chat template cut around the user message: ``head`` + context + question + ``tail``."""

    head: str
    tail: str

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatFrame":
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _CTX + _Q}], tokenize=False, add_generation_prompt=True
            )
            head, rest = text.split(_CTX)
            between, tail = rest.split(_Q)
            if between:
                raise ValueError(f"chat template inserts text between context and question: {between!r}")
            return cls(head=head, tail=tail)
        bos = tokenizer.bos_token or ""
        return cls(head=bos, tail="\n")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_case(tokenizer, task: str, context_ids: list[int], question: str, answer_prefix: str, answer: str,
               meta: dict | None = None) -> PromptCase:
    """Assemble a case from already-tokenized context ids and plain-text question/answer."""
    frame = ChatFrame.for_tokenizer(tokenizer)
    prefix_ids = encode(tokenizer, frame.head) + list(context_ids)
    query_text = question + frame.tail + answer_prefix
    # Tokenize prefix+answer together so the answer's tokens are the model's natural ones, then split.
    joint = encode(tokenizer, query_text + answer)
    query_only = encode(tokenizer, query_text)
    if joint[: len(query_only)] != query_only:
        raise ValueError(f"answer {answer!r} changes the tokenization of the answer prefix {answer_prefix!r}")
    return PromptCase(task=task, prefix_ids=prefix_ids, query_ids=query_only, answer_ids=joint[len(query_only):],
                      answer_text=answer, meta=dict(meta or {}))


def check_length(n_tokens: int, minimum: int = 64) -> None:
    if not isinstance(n_tokens, int) or n_tokens < minimum:
        raise ValueError(f"n_tokens must be an int >= {minimum}, got {n_tokens!r}")


def last_integer(text: str) -> int | None:
    """The last integer in ``text`` (the LongEval scoring rule), or None."""
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def first_integer(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[0]) if found else None
