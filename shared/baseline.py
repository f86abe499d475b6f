"""Full-cache baseline of a model: passkey accuracy per context length and corpus perplexity — the reference every
KV-cache paper's gate uses. ``python -m shared.baseline [--model smollm2-135m] [--lengths 1024 2048 4096 8192]``
writes ``reports/baseline_<model>.json`` and ``.md``."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

from shared.cache.base import full_cache, record_prefill
from shared.io import write_json, write_text_atomic
from shared.kv_eval import greedy_generate
from shared.metrics import wilson_interval
from shared.models import timed_load
from shared.paths import REPORTS_DIR
from shared.reports import markdown_table
from shared.tasks import corpus_text, passkey, perplexity, score_passkey


def passkey_accuracy(model, tok, length: int, n: int, seed: int) -> dict:
    hits, t0 = 0, time.perf_counter()
    for i in tqdm(range(n), desc=f"passkey@{length}", leave=False):
        case = passkey(tok, length, seed * 100_003 + i)
        ids = torch.tensor([case.prefix_ids + case.query_ids])
        rec = record_prefill(model, ids)
        out = greedy_generate(model, full_cache(rec), rec.last_logits, ids.shape[1], 8, tok.eos_token_id)
        hits += score_passkey(tok.decode(out[0]), case)
    lo, hi = wilson_interval(hits, n)
    return {"length": length, "n": n, "accuracy": hits / n, "ci95": [lo, hi],
            "seconds_per_case": (time.perf_counter() - t0) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    model, tok, spec, load_s = timed_load(args.model)
    ids = torch.tensor(tok(corpus_text("validation"), add_special_tokens=False).input_ids[: args.ppl_tokens])
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, window=1024, stride=512)
    ppl["seconds"] = time.perf_counter() - t0
    rows = [passkey_accuracy(model, tok, L, args.n, args.seed) for L in args.lengths]
    result = {"model": args.model, "load_seconds": load_s, "validation_perplexity": ppl, "passkey": rows,
              "setting": f"greedy decoding, ≤ 8 new tokens, chat template; perplexity window 1024 stride 512 over "
                         f"the first {ppl['tokens'] + 1} validation tokens"}
    name = args.model.replace("/", "_")
    write_json(REPORTS_DIR / f"baseline_{name}.json", result)
    md = [f"# Full-cache baseline — {args.model}", "", result["setting"], "",
          f"Validation perplexity (Shakespeare, by-work split): **{ppl['ppl']:.2f}** over {ppl['tokens']} tokens", "",
          markdown_table(rows, [("length", "context tokens"), ("accuracy", "passkey acc"), ("ci95", "95% CI"),
                                ("n", "n"), ("seconds_per_case", "s / case")])]
    write_text_atomic(REPORTS_DIR / f"baseline_{name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
