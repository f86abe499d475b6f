"""Needle in a haystack over real text: a "special magic number" sentence inserted at a seeded depth into a
contiguous stretch of a corpus work (Shakespeare's test split by default). Correct iff the first integer of the
answer equals the number."""
from __future__ import annotations

import random

from shared.tasks.base import PromptCase, build_case, check_length, encode, first_integer

CITIES = ["Lisbon", "Kyoto", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Tbilisi", "Dakar", "Perth",
          "Bergen", "Cusco", "Tunis", "Riga", "Accra", "Hobart"]
INTRO = "Read the following text carefully. A special magic number is hidden in it.\n\n"


def needle(tokenizer, haystack: str, n_tokens: int, seed: int, depth: float | None = None) -> PromptCase:
    """One needle case with an exactly ``n_tokens``-token context cut from ``haystack`` at a seeded offset."""
    check_length(n_tokens, 128)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    city, number = rng.choice(CITIES), rng.randint(100000, 999999)
    depth = rng.random() if depth is None else depth
    sentence = encode(tokenizer, f"\nThe special magic number for {city} is {number}.\n")
    intro = encode(tokenizer, INTRO)
    head_len = len(build_case(tokenizer, "needle", [], "", "", "").prefix_ids)
    n_hay = n_tokens - head_len - len(intro) - len(sentence)
    hay_ids = encode(tokenizer, haystack)
    if n_hay < 8 or len(hay_ids) < n_hay:
        raise ValueError(f"haystack has {len(hay_ids)} tokens; n_tokens={n_tokens} needs {n_hay}")
    start = rng.randint(0, len(hay_ids) - n_hay)
    hay = hay_ids[start: start + n_hay]
    cut = int(round(depth * n_hay))
    context = intro + hay[:cut] + sentence + hay[cut:]
    return build_case(tokenizer, "needle", context, f"\n\nWhat is the special magic number for {city}?",
                      f"The special magic number for {city} is", f" {number}.",
                      meta={"number": number, "city": city, "depth": depth, "seed": seed})


def score_needle(answer: str, case: PromptCase) -> bool:
    return first_integer(answer) == case.meta["number"]
