"""Next-line multiple choice (log-likelihood): seeded generation and batched scoring on a tiny random Llama."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from shared.paths import CORPORA_DIR
from shared.tasks import ChoiceItem, next_line_choice, score_choice

WORDS = "ale bog cup den elm fig gum hay ink jam kit log mud nut oak pod rye sod tub urn vat wig yew zip".split()


class CharTok:
    """Character-level stand-in tokenizer (ids in the tiny model's vocab of 97)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def _synthetic_text(n_lines: int = 200) -> str:
    rng = random.Random(0)
    out = []
    for i in range(n_lines):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))))
        if i % 17 == 5:
            out.append("")  # blank lines are skipped
        if i % 23 == 7:
            out.append("ACT TWO SCENE ONE HERE")  # all-uppercase: never an option
    return "\n".join(out)


TEXT = _synthetic_text()
TOK = CharTok()


def test_seeded_and_prefix_stable():
    a = next_line_choice(TOK, 10, seed=1, text=TEXT)
    b = next_line_choice(TOK, 30, seed=1, text=TEXT)
    c = next_line_choice(TOK, 10, seed=2, text=TEXT)
    assert len(a) == 10 and len(b) == 30
    assert a == b[:10]
    assert [x.meta["line"] for x in a] != [x.meta["line"] for x in c]
    assert all(isinstance(x, ChoiceItem) for x in a)


@pytest.mark.parametrize("n_options,n_ctx", [(4, 3), (2, 1), (6, 5)])
def test_label_options_and_tokens(n_options, n_ctx):
    raw = TEXT.splitlines()
    candidates = {s.strip() for s in raw if len(s.split()) >= 4 and not s.isupper()}
    for item in next_line_choice(TOK, 20, seed=3, n_options=n_options, n_context_lines=n_ctx, text=TEXT):
        opts = item.meta["options"]
        assert len(opts) == len(item.option_ids) == n_options and len(set(opts)) == n_options
        assert set(opts) <= candidates
        true = opts[item.label]
        assert raw[item.meta["line"]].strip() == true
        before = [s.strip() for s in raw[:item.meta["line"]] if s.strip()][-n_ctx:]
        assert item.meta["context"] == "\n".join(before) + "\n"
        assert item.context_ids == TOK(item.meta["context"])["input_ids"]
        assert all(ids == TOK(o)["input_ids"] for ids, o in zip(item.option_ids, opts))
        assert item.meta["separately_tokenized"] == []
        n = len(true)
        assert all(0.7 * n <= len(o) <= 1.3 * n for o in opts)  # plenty of similar lengths in this text


@pytest.mark.parametrize("kwargs,match", [
    ({"n_items": 0}, "n_items.*0"), ({"n_options": 1}, "n_options.*1"), ({"n_context_lines": 0}, "n_context_lines.*0"),
    ({"split": "dev", "text": None}, "dev"), ({"text": "one two three four\nfive six seven eight"}, "too few usable"),
])
def test_bad_args_raise(kwargs, match):
    args = {"n_items": 3, "seed": 0, "text": TEXT, **kwargs}
    with pytest.raises(ValueError, match=match):
        next_line_choice(TOK, **args)


def _brute_force(model, item):
    out = []
    for opt in item.option_ids:
        ids = torch.tensor(item.context_ids + opt)
        lp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
        n = len(item.context_ids)
        out.append(sum(lp[p - 1, ids[p]].item() for p in range(n, len(ids))))
    return out


def test_batched_scores_match_unpadded(tiny_llama):
    items = next_line_choice(TOK, 4, seed=5, n_context_lines=2, text=TEXT)
    res = score_choice(tiny_llama, items, batch_size=3, progress=False)
    assert res["n"] == 4 and len(res["correct"]) == 4
    for item, got in zip(items, res["scores"]):
        assert got == pytest.approx(_brute_force(tiny_llama, item), abs=1e-5, rel=0)
    for k, item in enumerate(items):
        best = max(range(len(item.option_ids)), key=lambda o: res["scores"][k][o])
        assert res["correct"][k] == (best == item.label)
    assert res["accuracy"] == sum(res["correct"]) / 4 and 0.0 <= res["acc_norm"] <= 1.0


class Oracle(torch.nn.Module):
    """Puts all probability on the next token of whichever true sequence (context + true option) the row starts
    with; uniform elsewhere."""

    def __init__(self, items, vocab=97):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.truths = [i.context_ids + i.option_ids[i.label] for i in items]

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            for t in self.truths:
                if row[:len(t)] == t:
                    logits[r, :len(t) - 1] = -1e4
                    logits[r, torch.arange(len(t) - 1), torch.tensor(t[1:])] = 0.0
                    break
        return SimpleNamespace(logits=logits)


def test_oracle_gets_everything_right():
    items = next_line_choice(TOK, 6, seed=7, text=TEXT)
    res = score_choice(Oracle(items), items, batch_size=5, progress=False)
    assert res["accuracy"] == 1.0 and res["acc_norm"] == 1.0 and all(res["correct"])


def test_score_choice_bad_args(tiny_llama):
    items = next_line_choice(TOK, 1, seed=0, text=TEXT)
    with pytest.raises(ValueError, match="batch_size.*0"):
        score_choice(tiny_llama, items, batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        score_choice(tiny_llama, [])


@pytest.mark.skipif(not (CORPORA_DIR / "shakespeare" / "test").is_dir(), reason="corpus not fetched (make data)")
def test_real_shakespeare_lines():
    folder = CORPORA_DIR / "shakespeare" / "test"
    works = {f.stem: f.read_text(encoding="utf-8", errors="replace").splitlines() for f in folder.glob("*.txt")}
    all_lines = {s.strip() for raw in works.values() for s in raw}
    items = next_line_choice(TOK, 5, seed=0, split="test")
    assert items == next_line_choice(TOK, 5, seed=0, split="test")
    for item in items:
        raw = works[item.meta["work"]]
        true = item.meta["options"][item.label]
        assert raw[item.meta["line"]].strip() == true and len(true.split()) >= 4 and not true.isupper()
        assert len(set(item.meta["options"])) == 4
        assert all(o in all_lines and len(o.split()) >= 4 for o in item.meta["options"])
        assert item.meta["context"].count("\n") == 3
