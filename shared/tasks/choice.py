"""Seeded next-line multiple choice scored by log-likelihood: a local stand-in for the zero-shot log-likelihood
tasks (HellaSwag, PIQA, ARC, ... evaluated as in OpenCompass ``*_ppl`` / lm-eval-harness configs) that
MatryoshkaKV reports in its Table 1.

Task. Lines come from one corpus split (:func:`shared.corpus.documents`; the embedded Shakespeare corpus: one
work per file) or from a given ``text``. Only non-empty, stripped lines are used. An item takes ``n_context_lines``
consecutive non-empty lines of one work as the context (blank lines are skipped, works are never crossed) and asks
which of ``n_options`` candidate lines comes next. The true option is the next non-empty line; the distractors are
other lines of the same split with a similar character length (within ±30% when enough exist, else the closest
lengths), all distinct from the true line and from each other. Candidate lines (true or distractor) have at least
4 words and are neither all-uppercase (titles, ``ACT I.``) nor bracketed stage directions. The options are
shuffled; ``label`` is the index of the true line. Item ``k`` of seed ``s`` is drawn from
``random.Random(f"{s}-{k}")`` (plus the set of positions already used by items ``< k``, to avoid repeats), so a
prefix of the item list does not depend on ``n_items``.

Tokens. The context text is the context lines joined with ``"\\n"`` plus a final ``"\\n"``; an option text is its
line without a trailing newline. ``context_ids = tok(context)``; each option is tokenized jointly as
``tok(context + option)`` and its ids are the tail after ``context_ids``. If the joint tokenization does not
start with ``context_ids`` (a merge across the boundary), the option is tokenized on its own instead and its index
is recorded in ``meta["separately_tokenized"]``. No special tokens (BOS) are added.

Scoring (:func:`score_choice`). The score of an option is the summed log-probability (fp32 ``log_softmax`` of the
logits) of its tokens given the context; the prediction is the arg-max score (``accuracy``), and ``acc_norm`` uses
the score divided by the number of option tokens (lm-eval's token-length-normalized ``acc_norm``).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.corpus import Corpus, documents
from shared.paths import CORPORA_DIR

MIN_WORDS = 4
LENGTH_TOLERANCE = 0.3


@dataclass
class ChoiceItem:
    context_ids: list[int]
    option_ids: list[list[int]]
    label: int
    meta: dict = field(default_factory=dict)


def _is_candidate(line: str) -> bool:
    """A line that may serve as an option: ≥ 4 words, not all-uppercase, not a bracketed stage direction."""
    return (len(line.split()) >= MIN_WORDS and not line.isupper()
            and not line.startswith("[") and not line.endswith("]"))


def _split_works(split: str, corpus: Corpus | dict | str | None = None, root: Path = CORPORA_DIR
                 ) -> list[tuple[str, str]]:
    """``(work, text)`` per document of a split — the documents :func:`corpus_text` joins, in the same order (for
    the embedded corpus: one work per file, named by its file stem)."""
    return documents(split, corpus, root)


def _encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def next_line_choice(tokenizer, n_items: int, seed: int, split: str = "test", n_context_lines: int = 3,
                     n_options: int = 4, text: str | None = None,
                     corpus: Corpus | dict | str | None = None) -> list[ChoiceItem]:
    """``n_items`` seeded next-line multiple-choice items (see the module docstring) from ``split`` of ``corpus``
    (default: the embedded Shakespeare corpus). ``text`` replaces the corpus split (one work named ``"text"``).
    ``meta``: seed, index, work, line (0-based index of the true line in the work's ``splitlines()``), context
    (text), options (texts, in option order), separately_tokenized."""
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1, got {n_items!r}")
    if isinstance(n_options, bool) or not isinstance(n_options, int) or n_options < 2:
        raise ValueError(f"n_options must be an int >= 2, got {n_options!r}")
    if isinstance(n_context_lines, bool) or not isinstance(n_context_lines, int) or n_context_lines < 1:
        raise ValueError(f"n_context_lines must be an int >= 1, got {n_context_lines!r}")
    works = [("text", text)] if text is not None else _split_works(split, corpus)

    # (work, raw line index) of each non-empty line; positions = true-line candidates with enough context.
    lines: list[tuple[str, int, str]] = []  # (work, raw index, stripped text)
    positions: list[int] = []  # indices into `lines`
    for work, body in works:
        start = len(lines)
        for raw, line in enumerate(body.splitlines()):
            if line.strip():
                lines.append((work, raw, line.strip()))
        positions += [j for j in range(start + n_context_lines, len(lines)) if _is_candidate(lines[j][2])]
    pool = sorted({s for _, _, s in lines if _is_candidate(s)}, key=lambda s: (len(s), s))
    if not positions or len(pool) < n_options:
        raise ValueError(f"text has too few usable lines: {len(positions)} positions with {n_context_lines} "
                         f"context lines and {len(pool)} distinct candidate lines (need >= {n_options})")
    pool_lens = [len(s) for s in pool]

    items, used = [], set()
    for k in range(n_items):
        rng = random.Random(f"{seed}-{k}")
        j = rng.choice(positions)
        for _ in range(100):  # avoid repeating a position while unused ones are plentiful
            if j not in used:
                break
            j = rng.choice(positions)
        used.add(j)
        work, raw, true = lines[j]
        context = "\n".join(s for _, _, s in lines[j - n_context_lines:j]) + "\n"

        n = len(true)
        lo = bisect.bisect_left(pool_lens, n * (1 - LENGTH_TOLERANCE))
        hi = bisect.bisect_right(pool_lens, n * (1 + LENGTH_TOLERANCE))
        window = [s for s in pool[lo:hi] if s != true]
        if len(window) >= n_options - 1:
            distractors = rng.sample(window, n_options - 1)
        else:  # fall back to the closest lengths (deterministic order)
            others = sorted((s for s in pool if s != true), key=lambda s: (abs(len(s) - n), len(s), s))
            distractors = others[:n_options - 1]
        options = [true, *distractors]
        rng.shuffle(options)
        label = options.index(true)

        context_ids = _encode(tokenizer, context)
        option_ids, separate = [], []
        for o, option in enumerate(options):
            joint = _encode(tokenizer, context + option)
            if joint[:len(context_ids)] == context_ids and len(joint) > len(context_ids):
                option_ids.append(joint[len(context_ids):])
            else:
                option_ids.append(_encode(tokenizer, option))
                separate.append(o)
        if not context_ids or not all(option_ids):
            raise ValueError(f"tokenizer produced empty ids for item {k} (work {work!r}, line {raw})")
        items.append(ChoiceItem(context_ids=context_ids, option_ids=option_ids, label=label,
                                meta={"seed": seed, "index": k, "work": work, "line": raw, "context": context,
                                      "options": options, "separately_tokenized": separate}))
    return items


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first maximum on ties


@torch.no_grad()
def score_choice(model, items: list[ChoiceItem], batch_size: int = 16, progress: bool = True) -> dict:
    """Log-likelihood scores of every option of every item; returns ``{"accuracy", "n", "correct", "scores",
    "acc_norm"}`` (``scores[k][o]`` = summed log-prob of option ``o``'s tokens given item ``k``'s context)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not items:
        raise ValueError("items must be non-empty, got 0 items")
    device = next(model.parameters()).device
    seqs = [(k, o, item.context_ids + opt, len(item.context_ids))
            for k, item in enumerate(items) for o, opt in enumerate(item.option_ids)]
    seqs.sort(key=lambda s: -len(s[2]))  # longest first: little padding per batch, OOM shows up at once
    scores = [[0.0] * len(item.option_ids) for item in items]
    batches = [seqs[b:b + batch_size] for b in range(0, len(seqs), batch_size)]
    for batch in tqdm(batches, desc="choice", disable=not progress, leave=False):
        width = max(len(s[2]) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (_, _, seq, _) in enumerate(batch):
            ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        # Right padding with pad id 0 and no attention mask: under causal attention, position p only attends to
        # positions <= p, so the real tokens (all before the padding) are unaffected by the pad tokens. No mask is
        # passed on purpose, so that a custom attention function installed by the caller sees plain causal calls.
        logits = model(input_ids=ids.to(device)).logits
        for r, (k, o, seq, n_ctx) in enumerate(batch):
            targets = ids[r, n_ctx:len(seq)].to(logits.device)
            lp = torch.log_softmax(logits[r, n_ctx - 1:len(seq) - 1].float(), dim=-1)
            scores[k][o] = lp.gather(-1, targets[:, None]).double().sum().item()  # fp64 accumulation
    correct = [_argmax(s) == item.label for s, item in zip(scores, items)]
    correct_norm = [_argmax([v / len(opt) for v, opt in zip(s, item.option_ids)]) == item.label
                    for s, item in zip(scores, items)]
    return {"accuracy": sum(correct) / len(items), "n": len(items), "correct": correct, "scores": scores,
            "acc_norm": sum(correct_norm) / len(items)}
