import pytest

from shared.tasks import (corpus_text, last_integer, lines_for_tokens, longeval_lines, needle, passkey,
                          score_longeval, score_needle, score_passkey)
from shared.tasks.base import ChatFrame


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm[1]


@pytest.mark.model
@pytest.mark.parametrize("n", [256, 1000, 4096])
def test_passkey_context_has_exact_token_length_and_is_seeded(tok, n):
    a, b, c = passkey(tok, n, seed=3), passkey(tok, n, seed=3), passkey(tok, n, seed=4)
    assert len(a.prefix_ids) == n
    assert a.prefix_ids == b.prefix_ids and a.meta == b.meta
    assert a.meta["key"] != c.meta["key"] or a.meta["depth"] != c.meta["depth"]
    assert str(a.meta["key"]) in tok.decode(a.prefix_ids)
    assert tok.decode(a.answer_ids).strip() == f"{a.meta['key']}."


@pytest.mark.model
def test_prompt_uses_chat_template(tok):
    case = passkey(tok, 256, 0)
    text = tok.decode(case.prefix_ids + case.query_ids)
    frame = ChatFrame.for_tokenizer(tok)
    assert text.startswith(frame.head) and "<|im_start|>assistant" in text


@pytest.mark.model
def test_needle_is_in_shakespeare_text_and_scores(tok):
    hay = corpus_text("test")
    case = needle(tok, hay, 512, seed=1)
    assert len(case.prefix_ids) == 512
    assert f"special magic number for {case.meta['city']} is {case.meta['number']}" in tok.decode(case.prefix_ids)
    assert score_needle(f" {case.meta['number']}.", case)
    assert not score_needle(f" {case.meta['number'] + 1}.", case)
    assert not score_needle(" I do not know.", case)


@pytest.mark.model
def test_longeval_lines_format_and_scoring(tok):
    case = longeval_lines(tok, 20, seed=2)
    text = tok.decode(case.prefix_ids)
    assert text.count("REGISTER_CONTENT is <") == 20
    assert f"line {case.meta['key']}: REGISTER_CONTENT is <{case.meta['value']}>" in text
    assert score_longeval(f"The value is 12 then <{case.meta['value']}>", case)  # last integer rule
    assert not score_longeval(f"<{case.meta['value']}> or maybe 7", case)
    assert longeval_lines(tok, 20, seed=2).prefix_ids == case.prefix_ids
    n = lines_for_tokens(tok, 1024)
    assert len(longeval_lines(tok, n, 0).prefix_ids) <= 1024 < len(longeval_lines(tok, n + 1, 0).prefix_ids)


@pytest.mark.model
def test_passkey_scorer_rejects_wrong_answers(tok):
    case = passkey(tok, 256, 0)
    assert score_passkey(f" {case.meta['key']}.", case)
    assert not score_passkey(" 12.", case) and not score_passkey(" a number", case)


@pytest.mark.model
@pytest.mark.parametrize("bad", [-5, 0, 10, 1.5])
def test_bad_lengths_raise(tok, bad):
    with pytest.raises(ValueError, match="n_tokens"):
        passkey(tok, bad, 0)


@pytest.mark.model
def test_bad_depth_and_line_counts_raise(tok):
    with pytest.raises(ValueError, match="depth"):
        passkey(tok, 512, 0, depth=1.5)
    with pytest.raises(ValueError, match="n_lines"):
        longeval_lines(tok, 1, 0)


def test_last_integer():
    assert last_integer("a 1 b -2 c 30") == 30 and last_integer("none") is None


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        corpus_text("dev")
