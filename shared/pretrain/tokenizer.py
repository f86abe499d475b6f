"""Byte-level BPE for the pre-training harness, fitted with the ``tokenizers`` library on the train split of the
pre-training corpus (root ``params.yaml`` ``pretrain.corpus``; default: the embedded Shakespeare corpus)
(FRUGAL report §4: 8192 entries, so that on the tiny model the embedding + head do not hide the optimizer-state
differences, as SmolLM2's 49152-entry vocabulary would).

GPT-2-style byte-level pre-tokenization (regex split, bytes mapped to 256 printable symbols), no normalizer, so
``decode(encode(text)) == text`` for any text. The vocabulary has exactly ``vocab_size`` entries: the 256 byte
symbols, one special ``<|endoftext|>`` and the merges. Fitting is deterministic (same text → same JSON).

``python -m shared.pretrain.tokenizer fit`` (the root DVC stage ``fit-tokenizer``) reads ``pretrain.tokenizer`` and
``pretrain.corpus`` from the root ``params.yaml`` and writes ``data/tokenizers/<corpus>-bpe-<vocab_size>.json``
(``shakespeare-bpe-8192.json`` by default) atomically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.corpus import Corpus, as_corpus, text as corpus_text
from shared.io import atomic_path, read_yaml
from shared.paths import DATA_DIR, REPO_ROOT

DEFAULT_VOCAB_SIZE = 8192
SPECIAL_TOKENS = ("<|endoftext|>",)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TOKENIZERS_DIR = DATA_DIR / "tokenizers"


def tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str = "shakespeare") -> Path:
    return TOKENIZERS_DIR / f"{corpus}-bpe-{vocab_size}.json"


def fit_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
                  progress: bool = False) -> Tokenizer:
    """Fit a byte-level BPE with exactly ``vocab_size`` entries on ``texts`` (an iterable of strings).

    Raises ``ValueError`` if ``vocab_size`` is below the byte alphabet + specials, or if the text is too small to
    yield enough merges (at ``min_frequency``) to fill the vocabulary."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if isinstance(texts, str):
        texts = [texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise ValueError(f"the text yields only {got} BPE entries at min_frequency={min_frequency}, "
                         f"fewer than vocab_size={vocab_size}; fit on more text or ask for fewer entries")
    return tok


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The fitted tokenizer (default: ``data/tokenizers/shakespeare-bpe-8192.json``)."""
    path = Path(path) if path is not None else tokenizer_path()
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; run `dvc repro fit-tokenizer` "
                                f"(or `python -m shared.pretrain.tokenizer fit`)")
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tok`` as JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
        tmp.chmod(0o644)  # mkstemp creates 0600; the JSON is a shared data artefact
    return Path(path)


def pretrain_corpus(params: dict | None = None) -> Corpus:
    """The pre-training corpus: ``pretrain.corpus`` of the root ``params.yaml`` (default: the embedded Shakespeare
    corpus). The tokenizer is fitted on its train split; the pre-training runs train and validate on it."""
    params = read_yaml(REPO_ROOT / "params.yaml") if params is None else params
    return as_corpus(params.get("pretrain", {}).get("corpus") or {}, "params.yaml: pretrain.corpus")


def fit_corpus_tokenizer(params: dict, out: Path | None = None, progress: bool = True) -> tuple[Path, float]:
    """Fit on the train split of :func:`pretrain_corpus` with the root ``pretrain.tokenizer`` params; returns
    (path, fit seconds)."""
    cfg = params.get("pretrain", {}).get("tokenizer", {})
    unknown = sorted(set(cfg) - {"vocab_size", "min_frequency"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in params.yaml: pretrain.tokenizer (allowed: vocab_size, "
                         f"min_frequency; the corpus is pretrain.corpus)")
    vocab_size = int(cfg.get("vocab_size", DEFAULT_VOCAB_SIZE))
    min_frequency = int(cfg.get("min_frequency", 2))
    corpus = pretrain_corpus(params)
    text = corpus_text("train", corpus)
    t0 = time.perf_counter()
    tok = fit_tokenizer([text], vocab_size, min_frequency=min_frequency, progress=progress)
    seconds = time.perf_counter() - t0
    path = save_tokenizer(tok, out or tokenizer_path(vocab_size, corpus.name))
    return path, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["fit"])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    parser.add_argument("--out", default=None, help="output JSON (default: data/tokenizers/<corpus>-bpe-<V>.json)")
    args = parser.parse_args(argv)
    path, seconds = fit_corpus_tokenizer(read_yaml(args.params), Path(args.out) if args.out else None)
    print(f"tokenizer ready: {path} (fit {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
