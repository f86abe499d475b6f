"""LongEval "lines" retrieval (Li et al., 2023, "How long can open-source LLMs truly promise on context length?"),
generated locally and seeded, as used by CSKV Table 1.

Each line: ``line <adjective>-<noun>: REGISTER_CONTENT is <N>`` with N uniform in 1..50000 and unique keys; the
question asks for one line's REGISTER_CONTENT; greedy decoding (≤ 100 new tokens in the paper); correct iff the
last integer in the answer equals N.
"""
from __future__ import annotations

import random

from shared.tasks.base import PromptCase, build_case, encode, last_integer

ADJECTIVES = ("able acid aged airy ample apt arid avid bald bare bold brave brief brisk calm cheap chief civil "
              "clean clear close cold cool crisp cute damp dark dear deep dense dry dull eager early easy elder "
              "empty equal even exact faint fair fancy fast fierce final fine firm flat fond frail free fresh full "
              "giant glad grand grave great green grim gross happy hard harsh heavy high holy huge humble ideal "
              "idle jolly keen kind large late lazy lean light live loud lucky mad major mild minor modest moist "
              "narrow neat new nice noble odd old pale plain polite poor proud pure quick quiet rapid rare raw "
              "ready real rich right rigid ripe rough round royal rude sad safe sharp shiny short shy silent "
              "simple sleek slim slow small smart smooth soft solid sour spare stark steep stiff still stout "
              "strict strong sunny super sweet swift tall tame tender thick thin tidy tight tiny tough true "
              "upset urban usual vague vast vivid warm weak weary wet white whole wide wild wise young").split()
NOUNS = ("ant ape bat bear bee bird boar bull camel cat clam cobra cod colt cow crab crane crow deer dog dove "
         "duck eagle eel elk emu falcon ferret finch fish flea fly fox frog gecko gnat goat goose gull hare "
         "hawk hen heron horse hound ibis jay koala lamb lark lemur lion llama lynx mole moose moth mouse mule "
         "newt otter owl ox panda parrot pig pony puma quail rabbit ram rat raven robin seal shark sheep shrew "
         "skunk sloth slug snail snake sole squid stork swan tapir tiger toad trout tuna turkey viper vole "
         "wasp whale wolf wombat worm wren yak zebra").split()
PREAMBLE = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
            "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
            "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
            "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")


def longeval_lines(tokenizer, n_lines: int, seed: int) -> PromptCase:
    """One LongEval lines case with ``n_lines`` lines (the paper's lengths: ~4k tokens ≈ 200 lines for Llama
    tokenizers; use :func:`lines_for_tokens` to pick ``n_lines`` for a token budget)."""
    if not isinstance(n_lines, int) or not 2 <= n_lines <= len(ADJECTIVES) * len(NOUNS):
        raise ValueError(f"n_lines must be an int in [2, {len(ADJECTIVES) * len(NOUNS)}], got {n_lines!r}")
    rng = random.Random(seed)
    keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], n_lines)
    values = [rng.randint(1, 50000) for _ in keys]
    target = rng.randrange(n_lines)
    body = "".join(f"line {k}: REGISTER_CONTENT is <{v}>\n" for k, v in zip(keys, values))
    context = encode(tokenizer, PREAMBLE + body)
    question = (f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {keys[target]}? "
                "I need the number.")
    return build_case(tokenizer, "longeval_lines", context, question,
                      f"The <REGISTER_CONTENT> in line {keys[target]} is", f" <{values[target]}>.",
                      meta={"key": keys[target], "value": values[target], "n_lines": n_lines,
                            "target_line": target, "seed": seed})


def lines_for_tokens(tokenizer, n_tokens: int, seed: int = 0) -> int:
    """Largest line count whose context fits in ``n_tokens`` tokens (measured, not estimated)."""
    lo, hi = 2, max(3, n_tokens // 4)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(longeval_lines(tokenizer, mid, seed).prefix_ids) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def score_longeval(answer: str, case: PromptCase) -> bool:
    """LongEval rule: the last integer in the answer equals the line's value."""
    return last_integer(answer) == case.meta["value"]
