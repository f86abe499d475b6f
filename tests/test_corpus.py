"""The corpus reader (shared/corpus.py): byte identity with the old direct file read on the embedded Shakespeare
corpus, and the text builder's behaviour on a tiny corpus (order, separator, per-work documents, errors)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import shared.corpus as corpus_mod
from shared.corpus import Corpus, CorpusError, as_corpus, documents, text, token_ids
from shared.paths import CORPORA_DIR
from shared.tasks import corpus_ids, corpus_text

SHAKESPEARE = CORPORA_DIR / "shakespeare"
needs_corpus = pytest.mark.skipif(not (SHAKESPEARE / "validation").is_dir(), reason="corpus not fetched (make data)")
#: sha256 of each split's text as the pre-`datasets` reader (below) gave it, measured on the fetched corpus
SHA256 = {"train": "1e4676d5509e3ab747cb76aec1c7674711d45401bd39a6037becf66ee9fb8882",
          "validation": "64ebad115523f51fd9801821b2e79ed344324a2df3c32cb45049db532c13150e",
          "test": "f9f013079306e01eec35b4b2f20711d877ef7edea26a828e4bafe7f3b8937c11"}


def direct_text(split: str, root: Path = CORPORA_DIR) -> str:
    """The reader this module replaced, kept as the reference: sorted files, read_text, blank line between works."""
    files = sorted((Path(root) / "shakespeare" / split).glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


class CharTok:
    """Character-level stand-in for a transformers tokenizer."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


# ---- the embedded corpus: identical to the direct read --------------------------------------------------------------
@needs_corpus
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_embedded_text_is_byte_identical_to_the_direct_read(split):
    got = corpus_text(split)
    assert got == direct_text(split)
    assert hashlib.sha256(got.encode()).hexdigest() == SHA256[split]
    works = documents(split)
    assert [w for w, _ in works] == [f.stem for f in sorted((SHAKESPEARE / split).glob("*.txt"))]
    assert "\n\n".join(t for _, t in works) == got


@needs_corpus
@pytest.mark.model
def test_embedded_token_ids_equal_the_direct_tokenization(smollm):
    _, tok, _ = smollm
    ref = direct_text("validation")
    for max_chars in (2_000_000, None, 50_000):
        want = torch.tensor(tok(ref[:max_chars] if max_chars else ref, add_special_tokens=False)["input_ids"])
        got = corpus_ids(tok, "validation", max_chars)
        assert got.dtype == torch.long and torch.equal(got, want)
        assert torch.equal(corpus_ids(tok, "validation", max_chars), want)      # the datasets cache, read back


@needs_corpus
def test_pretrain_bpe_ids_equal_the_direct_encoding():
    from shared.pretrain.data import encode_split
    from shared.pretrain.tokenizer import fit_tokenizer

    tok = fit_tokenizer([direct_text("validation")[:20_000]], vocab_size=300)
    want = torch.tensor(tok.encode(direct_text("validation"), add_special_tokens=False).ids, dtype=torch.long)
    assert torch.equal(encode_split(tok, "validation"), want)


def test_root_params_select_the_embedded_corpus_for_pretraining():
    from shared.io import read_yaml
    from shared.pretrain.tokenizer import fit_corpus_tokenizer, pretrain_corpus
    from shared.paths import REPO_ROOT

    assert pretrain_corpus(read_yaml(REPO_ROOT / "params.yaml")) == Corpus() == pretrain_corpus({})
    with pytest.raises(ValueError, match="pretrain.corpus"):
        fit_corpus_tokenizer({"pretrain": {"tokenizer": {"corpus": "shakespeare"}}})


# ---- a tiny corpus ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """``tmp/shakespeare/{train,validation,test}``: names whose sorted order is not their creation order, CRLF line
    ends, a BOM and an invalid UTF-8 byte; the datasets cache under tmp."""
    monkeypatch.setattr(corpus_mod, "DATASETS_CACHE", tmp_path / "cache")
    root = tmp_path / "corpora"
    files = {"train": {"b_work": b"second\r\nwork\r\n", "a_work": b"\xef\xbb\xbffirst work\n\nend",
                       "C_work": b"x\xff y"},
             "validation": {"val": b"one line\nanother line\n"}, "test": {"t1": b"t one", "t2": b"t two\r"}}
    for split, works in files.items():
        (root / "shakespeare" / split).mkdir(parents=True)
        for name, data in works.items():
            (root / "shakespeare" / split / f"{name}.txt").write_bytes(data)
    return root


def test_tiny_text_order_and_decoding_match_the_direct_read(tiny):
    for split in ("train", "validation", "test"):
        assert text(split, root=tiny) == direct_text(split, tiny)
    assert [w for w, _ in documents("train", root=tiny)] == ["C_work", "a_work", "b_work"]   # Path sort order
    assert documents("train", root=tiny)[2] == ("b_work", "second\nwork\n")                 # universal newlines
    assert documents("train", root=tiny)[0][1] == "x\ufffd y"                                # errors="replace"


def test_separator_and_split_mapping(tiny):
    assert text("test", Corpus(separator=" | "), tiny) == "t one | t two\n"
    c = Corpus(splits={"train": "train[1:]", "test": "validation"})
    assert [w for w, _ in documents("train", c, tiny)] == ["a_work", "b_work"]             # names follow the slice
    assert documents("test", c, tiny) == [("val", "one line\nanother line\n")]


def test_choice_task_reads_one_work_per_document(tiny):
    from shared.tasks.choice import _split_works

    assert _split_works("train", root=tiny) == documents("train", root=tiny)
    assert len(_split_works("train", root=tiny)) == 3


def test_token_ids_join_truncate_tokenize_once_and_are_cached(tiny):
    ref = direct_text("train", tiny)
    for max_chars in (None, 0, 7):
        want = [ord(c) for c in (ref[:max_chars] if max_chars else ref)]
        assert token_ids(CharTok(), "train", max_chars=max_chars, root=tiny).tolist() == want
    cached = sorted((tiny.parent / "cache").rglob("cache-*.arrow"))
    assert len(cached) == 3                              # one map result per max_chars
    token_ids(CharTok(), "train", max_chars=7, root=tiny)
    assert sorted((tiny.parent / "cache").rglob("cache-*.arrow")) == cached
    with pytest.raises(ValueError, match="max_chars"):
        token_ids(CharTok(), "train", max_chars=-1, root=tiny)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_unreachable_hf_id_names_the_offline_default(monkeypatch):
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)            # read at import: set the module values
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    c = Corpus(dataset="Salesforce/wikitext", config="wikitext-103-raw-v1", separator="")
    with pytest.raises(CorpusError, match=r"(?s)'Salesforce/wikitext'.*wikitext-103-raw-v1.*embedded Shakespeare"
                                          r".*dataset: shakespeare.*make data"):
        text("validation", c)


def test_bad_text_field_and_bad_split_spec(tiny):
    with pytest.raises(CorpusError, match=r"no text field 'body'.*\['text'\]"):
        text("train", Corpus(text_field="body"), tiny)
    with pytest.raises(CorpusError, match=r"bad split .nosuch. \(corpus\.splits\.test\)"):
        text("test", Corpus(splits={"test": "nosuch"}), tiny)
    with pytest.raises(CorpusError, match="selects no documents"):
        text("validation", Corpus(splits={"validation": "validation[:10%]"}), tiny)


def test_unknown_split_key_and_params_errors_name_the_key(tiny):
    with pytest.raises(ValueError, match="split must be train/validation/test, got 'dev'"):
        text("dev", root=tiny)
    with pytest.raises(ValueError, match=r"splits\.dev: unknown parameter"):
        as_corpus({"splits": {"dev": "train"}})
    with pytest.raises(ValueError, match=r"text_feld: unknown parameter"):
        as_corpus({"dataset": "shakespeare", "text_feld": "body"})
    assert as_corpus("shakespeare") == as_corpus(None) == Corpus()


def test_missing_embedded_files_say_make_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"make data.*fetch-corpus"):
        text("train", root=tmp_path)
