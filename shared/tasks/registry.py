"""The task registry: every long-context retrieval task has one generator signature

    generator(tokenizer, context_tokens: int, seed: int) -> PromptCase

(the context — chat header included — is ``context_tokens`` tokens long in the model's tokenizer). A task that needs
a corpus reads it inside (needle: Shakespeare's test split); a task parameterised by something else converts
(LongEval lines: the largest line count that fits). Adding a task = its generator + one line in :data:`TASKS`.
Paper params name tasks; :func:`make_cases` builds a table's cases with the one case-seed rule.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from shared.tasks.base import PromptCase

#: name → "module:generator" (one line per task)
TASKS: dict[str, str] = {
    "passkey": "shared.tasks.passkey:passkey",
    "needle": "shared.tasks.registry:needle_in_corpus",
    "longeval_lines": "shared.tasks.registry:longeval_lines_tokens",
}
#: name → "module:scorer" (answer text, case) → bool, for free generation
SCORERS: dict[str, str] = {
    "passkey": "shared.tasks.passkey:score_passkey",
    "needle": "shared.tasks.needle:score_needle",
    "longeval_lines": "shared.tasks.longeval:score_longeval",
}


def _load(table: dict[str, str], name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def task_generator(name: str):
    return _load(TASKS, name, "task")


def task_scorer(name: str):
    return _load(SCORERS, name, "task")


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a table run with ``seed`` (distinct across tables' seeds for < 100 003 cases)."""
    return seed * 100_003 + index


def make_case(name: str, tokenizer, context_tokens: int, seed: int) -> PromptCase:
    return task_generator(name)(tokenizer, context_tokens, seed)


def make_cases(name: str, tokenizer, context_tokens: int, n: int, seed: int) -> list[PromptCase]:
    """``n`` cases of task ``name`` at ``context_tokens`` tokens, case i seeded with :func:`case_seed`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (cases) must be an int >= 1, got {n!r}")
    gen = task_generator(name)
    return [gen(tokenizer, context_tokens, case_seed(seed, i)) for i in range(n)]


@lru_cache(maxsize=4)
def _haystack(split: str) -> str:
    from shared.tasks.perplexity import corpus_text

    return corpus_text(split)


def needle_in_corpus(tokenizer, context_tokens: int, seed: int, split: str = "test") -> PromptCase:
    """Needle in a haystack of Shakespeare's ``split`` split (the registered ``needle``)."""
    from shared.tasks.needle import needle

    return needle(tokenizer, _haystack(split), context_tokens, seed)


def longeval_lines_tokens(tokenizer, context_tokens: int, seed: int) -> PromptCase:
    """LongEval lines with as many lines as fit in ``context_tokens`` (the registered ``longeval_lines``)."""
    from shared.tasks.longeval import lines_for_tokens, longeval_lines

    return longeval_lines(tokenizer, lines_for_tokens(tokenizer, context_tokens), seed)
