"""The one text-corpus reader: every stage that reads running text goes through here, via HF ``datasets``.

A corpus is named by a :class:`Corpus` params block (``corpus:`` in a paper's ``params.yaml``; ``pretrain.corpus``
in the root one for the pre-training papers):

* the default, ``dataset: shakespeare``, is the **embedded** corpus, offline: the files the root stage
  ``fetch-corpus`` (``make data``) writes to ``data/corpora/shakespeare/{train,validation,test}/<work>.txt``, loaded
  with the ``text`` builder of ``datasets`` (one row per file = one work, files in sorted order, UTF-8 with
  ``errors="replace"``, universal newlines: the same string ``Path.read_text`` gives), cached under
  ``data/cache/datasets``;
* any other ``dataset`` is a Hugging Face dataset id (needs internet the first time, then the HF cache), with an
  optional ``config`` and ``revision``, the HF split of each of our splits (slicing such as ``train[:1%]`` works),
  the ``text_field`` and the ``separator`` that joins its rows.

A split's text is its rows joined with ``separator`` (``"\\n\\n"``, blank lines between works). Token ids are the
tokenization of that text (truncated to ``max_chars`` characters first) as one string, computed by ``Dataset.map``
so that ``datasets``' fingerprint cache stores them next to the dataset and a second call reads them back.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from shared.paths import CACHE_DIR, CORPORA_DIR
from shared.stages import Params, parse_params

SPLITS = ("train", "validation", "test")
EMBEDDED = ("shakespeare",)          # corpora fetched into data/corpora/<name>/ by a root DVC stage
DATASETS_CACHE = CACHE_DIR / "datasets"
OFFLINE_DEFAULT = ("the embedded Shakespeare corpus, which needs no internet: `dataset: shakespeare` (the default) in "
                   "the `corpus:` block of the paper's params.yaml (pre-training papers: `pretrain.corpus` in the root "
                   "params.yaml), fetched by `make data` (dvc repro fetch-corpus)")


class CorpusError(RuntimeError):
    """A corpus could not be loaded (HF id unreachable or unknown, bad config, split or text field)."""


class Splits(Params):
    """The dataset split read for each of our splits (any ``datasets`` split spec: ``train``, ``train[:1%]``...)."""

    train: str = Field("train", min_length=1)
    validation: str = Field("validation", min_length=1)
    test: str = Field("test", min_length=1)


class Corpus(Params):
    """Which text a stage reads (see the module docstring); the defaults are the embedded Shakespeare corpus."""

    dataset: str = Field(EMBEDDED[0], min_length=1)   # an embedded corpus name, else a Hugging Face dataset id
    config: str | None = None                          # HF config name, e.g. wikitext-103-raw-v1
    revision: str | None = None                        # HF revision, e.g. refs/convert/parquet
    splits: Splits = Splits()
    text_field: str = Field("text", min_length=1)
    separator: str = "\n\n"                            # joins the rows (documents) of a split

    @property
    def embedded(self) -> bool:
        return self.dataset in EMBEDDED

    @property
    def name(self) -> str:
        """A file-name-safe label: ``shakespeare``, ``Salesforce-wikitext-wikitext-103-raw-v1``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(filter(None, (self.dataset, self.config))))


def as_corpus(corpus: Corpus | dict | str | None, source: str = "corpus") -> Corpus:
    """``None`` → the default; a string → ``Corpus(dataset=...)`` (the old ``corpus="shakespeare"`` argument); a
    mapping → validated (``ValueError`` naming ``source`` and the bad key)."""
    if corpus is None:
        return Corpus()
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, str):
        corpus = {"dataset": corpus}
    return parse_params(Corpus, corpus, source)


def _embedded_files(corpus: Corpus, root: Path) -> dict[str, list[Path]]:
    files = {s: sorted((Path(root) / corpus.dataset / s).glob("*.txt")) for s in SPLITS}
    for s, found in files.items():
        if not found:
            raise FileNotFoundError(f"no corpus files in {Path(root) / corpus.dataset / s}; run `make data` "
                                    f"(dvc repro fetch-corpus)")
    return files


def _load(corpus: Corpus, split: str, root: Path):
    """The ``datasets.Dataset`` of one split (rows = documents) and the name of each row."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be train/validation/test, got {split!r}")
    spec = getattr(corpus.splits, split)
    if corpus.embedded:
        files = _embedded_files(corpus, root)
        try:                                              # the files a split spec selects, as datasets reads them
            parts = datasets.ReadInstruction.from_spec(spec).to_absolute({s: len(fs) for s, fs in files.items()})
        except ValueError as e:
            raise CorpusError(f"corpus {corpus.dataset!r}: bad split {spec!r} (corpus.splits.{split}): {e}") from None
        names = [f.stem for a in parts for f in files[a.splitname][a.from_:a.to]]
        if not names:
            raise CorpusError(f"corpus {corpus.dataset!r}: split {spec!r} (corpus.splits.{split}) selects no "
                              f"documents")
        ds = datasets.load_dataset("text", data_files={s: [str(f) for f in fs] for s, fs in files.items()},
                                   split=spec, sample_by="document", encoding="utf-8", encoding_errors="replace",
                                   cache_dir=str(DATASETS_CACHE))
        if len(names) != len(ds):
            raise RuntimeError(f"corpus {corpus.dataset!r} split {spec!r}: {len(ds)} documents for {len(names)} "
                               f"files")
    else:
        where = (f"HF dataset {corpus.dataset!r}" + (f" (config {corpus.config!r})" if corpus.config else "")
                 + (f" at revision {corpus.revision!r}" if corpus.revision else ""))
        try:
            ds = datasets.load_dataset(corpus.dataset, corpus.config, split=spec, revision=corpus.revision)
        except Exception as e:  # offline, unknown id/config/split, a script dataset...: one message, with the way out
            raise CorpusError(f"cannot load split {spec!r} of {where}: {type(e).__name__}: {e}\n"
                              f"  Offline default: {OFFLINE_DEFAULT}.") from e
        names = [f"{spec}#{i}" for i in range(len(ds))]
    if corpus.text_field not in ds.column_names:
        raise CorpusError(f"corpus {corpus.dataset!r} split {spec!r} has no text field {corpus.text_field!r} "
                          f"(corpus.text_field); its columns are {ds.column_names}")
    feature = ds.features[corpus.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"corpus {corpus.dataset!r}: field {corpus.text_field!r} holds {feature}, not text "
                          f"(corpus.text_field); its columns are {ds.column_names}")
    return ds, names


def documents(split: str, corpus: Corpus | dict | str | None = None, root: Path = CORPORA_DIR
              ) -> list[tuple[str, str]]:
    """``(name, text)`` per document (row) of a split, in order; for the embedded corpus the name is the file
    stem (the work)."""
    c = as_corpus(corpus)
    ds, names = _load(c, split, root)
    return list(zip(names, ds[c.text_field]))


def text(split: str, corpus: Corpus | dict | str | None = None, root: Path = CORPORA_DIR) -> str:
    """The text of a split: its documents joined with ``corpus.separator``."""
    c = as_corpus(corpus)
    ds, _ = _load(c, split, root)
    return c.separator.join(ds[c.text_field])


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens, for a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_split(batch: dict[str, list], tokenizer: Any, field: str, separator: str,
                  max_chars: int | None) -> dict[str, list]:
    """``Dataset.map`` function over a whole split (one batch): join, truncate, tokenize once → one row."""
    joined = separator.join(batch[field])
    return {"ids": [_encode(tokenizer, joined[:max_chars] if max_chars else joined)]}


def token_ids(tokenizer, split: str, corpus: Corpus | dict | str | None = None, max_chars: int | None = None,
              root: Path = CORPORA_DIR) -> torch.Tensor:
    """Token ids (1-D int64) of the first ``max_chars`` characters (``None``/0: all) of a split's :func:`text`,
    tokenized as one string without special tokens; cached by ``datasets`` (keyed by the dataset, the tokenizer,
    the separator and ``max_chars``)."""
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0):
        raise ValueError(f"max_chars must be None or an int >= 0, got {max_chars!r}")
    c = as_corpus(corpus)
    ds, _ = _load(c, split, root)
    out = ds.map(_encode_split, batched=True, batch_size=None, remove_columns=ds.column_names,
                 fn_kwargs={"tokenizer": tokenizer, "field": c.text_field, "separator": c.separator,
                            "max_chars": max_chars}, desc=f"tokenizing {c.name} {split}")
    return torch.tensor(out.with_format("numpy")[0]["ids"], dtype=torch.long)
