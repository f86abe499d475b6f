"""Byte-level BPE for the pre-training harness, fitted with the ``tokenizers`` library on the Shakespeare train split
(FRUGAL report §4: 8192 entries, so that on the tiny model the embedding + head do not hide the optimizer-state
differences, as SmolLM2's 49152-entry vocabulary would).

GPT-2-style byte-level pre-tokenization (regex split, bytes mapped to 256 printable symbols), no normalizer, so
``decode(encode(text)) == text`` for any text. The vocabulary has exactly ``vocab_size`` entries: the 256 byte
symbols, one special ``<|endoftext|>`` and the merges. Fitting is deterministic (same text → same JSON).

``python -m shared.pretrain.tokenizer fit`` (the root DVC stage ``fit-tokenizer``) reads ``pretrain.tokenizer`` from
the root ``params.yaml`` and writes ``data/tokenizers/shakespeare-bpe-<vocab_size>.json`` atomically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def fit_corpus_tokenizer(params: dict, out: Path | None = None, progress: bool = True) -> tuple[Path, float]:
    """Fit on ``corpus_text("train")`` with the root ``pretrain.tokenizer`` params; returns (path, fit seconds)."""
    from shared.tasks.perplexity import corpus_text

    cfg = params.get("pretrain", {}).get("tokenizer", {})
    vocab_size = int(cfg.get("vocab_size", DEFAULT_VOCAB_SIZE))
    min_frequency = int(cfg.get("min_frequency", 2))
    corpus = cfg.get("corpus", "shakespeare")
    text = corpus_text("train", corpus=corpus)
    t0 = time.perf_counter()
    tok = fit_tokenizer([text], vocab_size, min_frequency=min_frequency, progress=progress)
    seconds = time.perf_counter() - t0
    path = save_tokenizer(tok, out or tokenizer_path(vocab_size, corpus))
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
