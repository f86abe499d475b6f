"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random 5-digit key hidden at a seeded depth in repeated filler.

Scored as correct iff the first integer of the answer equals the key. The question wording was calibrated on the
embedded SmolLM2-135M (a "The pass key is a number." variant made it answer "a number"); see tests/test_tasks.py.
"""
from __future__ import annotations

import random

from shared.tasks.base import PromptCase, build_case, check_length, encode, first_integer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


def passkey(tokenizer, n_tokens: int, seed: int, depth: float | None = None) -> PromptCase:
    """One passkey case whose context (chat header included) is exactly ``n_tokens`` tokens long.

    Args:
        n_tokens: length of the prefilled context in the model's tokens (≥ 128).
        seed: case seed; same seed → same key, depth and ids.
        depth: relative position of the key in the filler, in [0, 1]; drawn from the seed when None.
    """
    check_length(n_tokens, 128)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    depth = rng.random() if depth is None else depth
    needle = encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
    intro = encode(tokenizer, INTRO)
    head_len = len(build_case(tokenizer, "passkey", [], "", "", "").prefix_ids)
    n_filler = n_tokens - head_len - len(intro) - len(needle)
    if n_filler < 8:
        raise ValueError(f"n_tokens={n_tokens} is too short for a passkey case (needs > {n_tokens - n_filler + 8})")
    unit = encode(tokenizer, FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    cut = int(round(depth * n_filler))
    context = intro + filler[:cut] + needle + filler[cut:]
    return build_case(tokenizer, "passkey", context, QUESTION, ANSWER_PREFIX, f" {key}.",
                      meta={"key": key, "depth": depth, "seed": seed})


def score_passkey(answer: str, case: PromptCase) -> bool:
    return first_integer(answer) == case.meta["key"]
