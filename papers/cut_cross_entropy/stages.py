"""Cut Cross-Entropy pipeline stages (run by papers/cut_cross_entropy/dvc.yaml):
``python -m papers.cut_cross_entropy.stages <stage>``.

    memory       peak memory of each loss implementation: measured on CPU at scaled-down shapes, analytic at the
                 paper's Gemma-2 (2B) shape  → results/memory.json
    convergence  fine-tune SmolLM2-135M on Shakespeare with the baseline loss vs ours through the same
                 LightningModule, same seed and data order  → results/convergence.json

Verdict rules are fixed here (``_memory_claims``, ``_convergence_claims``), before any result is seen. The runner in
``shared.stages`` owns params validation, MLflow, seeds and result files.
"""
from __future__ import annotations

import math
import os
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from shared.stages import Paper, Params, StageContext

RESULT_FILES = ("memory.json", "convergence.json")
MB = 2**20                                               # MiB, as torch.cuda.max_memory_allocated() / 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: paper / official benchmark numbers the rows are compared with (paper.yaml, table1 + official_benchmark)
PAPER_GEMMA = {"torch": {"fw": 24000.0, "fwbw": 28000.0}, "triton": {"fw": 1.1, "fwbw": 1164.0}}
#: convergence rule: 10-step moving averages never differ by more than this (nats) ...
MAX_MA_GAP_NATS = 0.05
#: ... and the final (moving-average) losses agree within this relative tolerance
FINAL_REL_TOL = 0.01
#: memory rules: measured baseline bytes within this relative error of the analytic count ...
ANALYTIC_REL_TOL = 0.05
#: ... and CCE's measured forward bytes per token at most the paper's (1.1 MB for 8192 tokens): O(N), no N×V buffer
CCE_FW_BYTES_PER_TOKEN = 1.1 * MB / 8192


LossImpl = Literal["torch", "torch_chunked", "triton"]   # papers.cut_cross_entropy.module.LOSS_IMPLS


class Shape(Params):
    name: str
    n: int = Field(ge=1)
    d: int = Field(ge=1)
    v: int = Field(ge=1)


class Memory(Params):
    chunks: int = Field(ge=1)
    measured_dtype: Literal["float32", "bfloat16", "float16"]
    measured_shapes: list[Shape] = Field(min_length=1)
    interpreter_shape: Shape
    paper_shape: Shape


class Convergence(Params):
    baseline: LossImpl
    impl: LossImpl
    trainable_blocks: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    batch_size: int = Field(ge=1)
    steps: int = Field(ge=1)
    distinct_batches: int = Field(ge=1)
    val_batches: int = Field(ge=1)
    lr: float = Field(gt=0, lt=1)
    weight_decay: float = Field(ge=0)
    chunk_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _differ(self):
        if self.baseline == self.impl:
            raise ValueError(f"convergence.impl must differ from convergence.baseline, both are {self.impl!r}")
        return self


class CCEParams(Params):
    seed: int
    model: str
    threads: int = Field(ge=1)
    memory: Memory
    convergence: Convergence


def _before(stage: str, params: CCEParams) -> None:
    if stage == "memory" and not torch.cuda.is_available():
        # The CCE kernel runs under the Triton CPU interpreter (tiny shape only). The variable must be set before
        # `triton` is first imported (the stage bodies import it through kernels/lightning), or the kernels break.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(params.threads)


paper = Paper("cut_cross_entropy", CCEParams, __file__, before_stage=_before)
main = paper.main


# ---- memory ------------------------------------------------------------------------------------------------
def _mem_row(shape: dict, impl: str, dtype: str, method: str, mem, analytic=None, seconds=None, chunk=None) -> dict:
    row = {"shape": shape["name"], "n": shape["n"], "d": shape["d"], "v": shape["v"], "impl": impl, "dtype": dtype,
           "method": method, "chunk": chunk, "fw_peak_mb": mem.fw_peak / MB, "fw_saved_mb": mem.fw_saved / MB,
           "fwbw_peak_mb": mem.fwbw_peak / MB, "largest_mb": mem.largest_tensor / MB, "seconds": seconds}
    if analytic is not None:
        row["analytic_fw_mb"], row["analytic_fwbw_mb"] = analytic.fw_peak / MB, analytic.fwbw_peak / MB
        row["fw_vs_analytic"] = mem.fw_peak / analytic.fw_peak
        row["fwbw_vs_analytic"] = mem.fwbw_peak / analytic.fwbw_peak
    return row


@paper.stage("memory")
def stage_memory(ctx: StageContext) -> dict:
    from papers.cut_cross_entropy.memory import analytic_loss_memory, measure_loss_memory

    p = ctx.params.model_dump()
    m = p["memory"]
    dtype = DTYPES[m["measured_dtype"]]
    dbytes = torch.finfo(dtype).bits // 8
    plan = [(s, impl) for s in m["measured_shapes"] for impl in ("torch", "torch_chunked")]
    plan += [(m["interpreter_shape"], impl) for impl in ("torch", "torch_chunked", "triton")]
    rows = []
    for shape, impl in plan:
        chunk = math.ceil(shape["n"] / m["chunks"]) if impl == "torch_chunked" else None
        mem, sec = measure_loss_memory(impl, shape["n"], shape["d"], shape["v"], dtype, chunk, p["seed"])
        ana = analytic_loss_memory(impl, shape["n"], shape["d"], shape["v"], dbytes, chunk)
        row = _mem_row(shape, impl, m["measured_dtype"], "measured", mem, ana, sec, chunk)
        rows.append(row)
        ctx.cell(f"{shape['name']}-n{shape['n']}-{impl}",
                 {k: v for k, v in row.items() if isinstance(v, float)}, {"shape": shape, "impl": impl})
        print(f"{shape['name']} N={shape['n']} {impl}: fw {row['fw_peak_mb']:.3f} MB, fw+bw "
              f"{row['fwbw_peak_mb']:.3f} MB (analytic {row['analytic_fw_mb']:.3f} / "
              f"{row['analytic_fwbw_mb']:.3f}) {sec:.1f}s", flush=True)
    ps = m["paper_shape"]
    for impl in ("torch", "torch_chunked", "triton"):
        chunk = math.ceil(ps["n"] / m["chunks"]) if impl == "torch_chunked" else None
        ana = analytic_loss_memory(impl, ps["n"], ps["d"], ps["v"], 2, chunk)
        row = _mem_row(ps, impl, "bfloat16", "analytic", ana, chunk=chunk)
        row["paper_fw_mb"] = PAPER_GEMMA.get(impl, {}).get("fw")
        row["paper_fwbw_mb"] = PAPER_GEMMA.get(impl, {}).get("fwbw")
        rows.append(row)
    claims = _memory_claims(rows)
    ctx.log_metrics({f"paper_shape.{r['impl']}.{k}": r[k] for r in rows if r["method"] == "analytic"
                     for k in ("fw_peak_mb", "fwbw_peak_mb")})
    return {"memory.json": {
        "title": "Table 1 analogue — memory of the loss computation (fw) and of the classifier head (fw+bw)",
        "table_ref": "Table 1",
        "setting": (f"`measured`: CPU, {m['measured_dtype']}, random e ~ N(0,1), c ~ N(0,1/D); every tensor "
                    "storage created by an ATen op counted while alive (TorchDispatchMode + storage finalizers), "
                    "inputs excluded, gradients included; `fw_saved` = storages saved for backward "
                    "(saved_tensors_hooks). `triton` runs under the Triton CPU interpreter, tiny shape only. "
                    f"`analytic`: papers/cut_cross_entropy/memory.py at the paper's Gemma-2 (2B) shape in bf16. "
                    f"torch_chunked uses N/{m['chunks']} tokens per chunk. MB = 2^20 bytes."),
        "columns": [["shape", "shape"], ["n", "N"], ["impl", "impl"], ["dtype", "dtype"], ["method", "method"],
                    ["fw_peak_mb", "fw peak MB"], ["fw_saved_mb", "saved for bw MB"],
                    ["fwbw_peak_mb", "fw+bw peak MB"], ["largest_mb", "largest tensor MB"],
                    ["fw_vs_analytic", "fw measured/analytic"], ["fwbw_vs_analytic", "fw+bw measured/analytic"],
                    ["paper_fw_mb", "paper fw MB"], ["paper_fwbw_mb", "paper fw+bw MB"],
                    ["seconds", "s"]],
        "rows": rows, "claims": claims,
        "notes": ["`torch` = the paper's baseline F.cross_entropy((e @ cᵀ).float(), y); `torch_chunked` = exact "
                  "token-chunked PyTorch (TorchTune-style); `triton` = our CCE kernel.",
                  "The analytic count for `torch_chunked` models the fp32 loop (consecutive chunks' temporaries "
                  "overlap); for bf16 it is approximate. The CCE analytic forward (LSE + target logit) omits the "
                  "kernel's per-split (max, sum, logit) scratch, which the interpreter measurement includes.",
                  "No GPU was available: time columns of Table 1 and GPU peak memory are `make bench-gpu` "
                  "(kernels/bench/linear_cross_entropy_bench.py), not measured here."]}}


def _memory_claims(rows: list[dict]) -> list[dict]:
    """Fixed rules: 'partially reproduced' when (a) the measured baseline matches the analytic count within
    ANALYTIC_REL_TOL at every measured shape, (b) measured CCE forward memory is at most CCE_FW_BYTES_PER_TOKEN
    bytes per token at the interpreter shape, and (c) the analytic reduction at the paper's shape is >= 1000x (fw) /
    >= 10x (fw+bw). 'reproduced' needs a GPU measurement at the paper's shape (not possible here)."""
    measured = [r for r in rows if r["method"] == "measured"]
    base_ok = all(abs(r["fw_vs_analytic"] - 1) <= ANALYTIC_REL_TOL and abs(r["fwbw_vs_analytic"] - 1) <= ANALYTIC_REL_TOL
                  for r in measured if r["impl"] == "torch")
    tiny = {r["impl"]: r for r in measured if r["impl"] in ("torch", "triton") and r["shape"].startswith("tiny")}
    cce_ok = "triton" in tiny and tiny["triton"]["fw_peak_mb"] * MB / tiny["triton"]["n"] <= CCE_FW_BYTES_PER_TOKEN
    paper = {r["impl"]: r for r in rows if r["method"] == "analytic"}
    fw_ratio = paper["torch"]["fw_peak_mb"] / paper["triton"]["fw_peak_mb"]
    fwbw_ratio = paper["torch"]["fwbw_peak_mb"] / paper["triton"]["fwbw_peak_mb"]
    tiny_note = (f"measured at N={tiny['torch']['n']}, D={tiny['torch']['d']}, V={tiny['torch']['v']} (interpreter): "
                 f"CCE fw {tiny['triton']['fw_peak_mb'] * MB / 1024:.1f} KiB "
                 f"({tiny['triton']['fw_peak_mb'] * MB / tiny['triton']['n']:.0f} B/token, bound "
                 f"{CCE_FW_BYTES_PER_TOKEN:.0f}) vs baseline {tiny['torch']['fw_peak_mb'] * MB / 1024:.1f} KiB" if "triton" in tiny else "CCE not measured")
    checks = f"baseline measured = analytic within {ANALYTIC_REL_TOL:.0%}: {base_ok}; {tiny_note}"

    def verdict(ratio_ok: bool) -> str:
        return "partially reproduced" if (base_ok and cce_ok and ratio_ok) else "not reproduced"

    t, c = paper["torch"], paper["triton"]
    return [
        {"id": "loss_memory_24gb_to_1mb",
         "ours": f"analytic, Gemma-2 2B bf16 N=8192: baseline {t['fw_peak_mb']:.0f} MB → CCE {c['fw_peak_mb']:.3f} MB "
                 f"({fw_ratio:.0f}x)",
         "verdict": verdict(fw_ratio >= 1000),
         "note": f"{checks}. GPU measurement pending (make bench-gpu); rule in stages._memory_claims"},
        {"id": "head_memory_28gb_to_1gb",
         "ours": f"analytic, same shape, fw+bw incl. ∇E/∇C: baseline {t['fwbw_peak_mb']:.0f} MB → CCE "
                 f"{c['fwbw_peak_mb']:.0f} MB ({fwbw_ratio:.1f}x)",
         "verdict": verdict(fwbw_ratio >= 10),
         "note": f"{checks}. CCE's fw+bw is the gradients themselves (∇C = V·D bf16 = 1125 MB) + fp32 scratch"},
        {"id": "bench_forward_gemma2", "ours": "not measured (no GPU)", "verdict": "pending",
         "note": "time + GPU memory need `make bench-gpu` on a CUDA machine"},
        {"id": "bench_fwbw_gemma2", "ours": "not measured (no GPU)", "verdict": "pending",
         "note": "time + GPU memory need `make bench-gpu` on a CUDA machine"},
    ]


# ---- convergence -------------------------------------------------------------------------------------------
def _windows(tokenizer, split: str, seq_len: int, count: int, seed: int | None, max_chars: int = 1_000_000):
    """``count`` non-overlapping ``seq_len``-token windows of a corpus split (shuffled with ``seed``; in order if
    ``seed`` is None)."""
    from shared.tasks.perplexity import corpus_ids

    ids = corpus_ids(tokenizer, split, max_chars)
    n = ids.numel() // seq_len
    if n < count:
        raise ValueError(f"the {split} split gives {n} windows of {seq_len} tokens, fewer than the {count} needed")
    wins = ids[: n * seq_len].view(n, seq_len)
    if seed is not None:
        wins = wins[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return wins[:count]


def moving_average(xs: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (shorter windows at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


@paper.stage("convergence")
def stage_convergence(ctx: StageContext) -> dict:
    from papers.cut_cross_entropy.module import (CausalLMFineTune, fine_tune, freeze_all_but_last,
                                                 frozen_prefix_hidden, trainable_suffix)

    p = ctx.params.model_dump()
    c = p["convergence"]
    t_start = time.perf_counter()
    model, tok, spec = ctx.model()
    n_frozen = spec.num_layers - c["trainable_blocks"]
    if n_frozen < 1:
        raise ValueError(f"convergence.trainable_blocks must be < the model's {spec.num_layers} layers, got "
                         f"{c['trainable_blocks']}")
    bs, T = c["batch_size"], c["seq_len"]
    train_ids = _windows(tok, "train", T, c["distinct_batches"] * bs, p["seed"])
    val_ids = _windows(tok, "validation", T, c["val_batches"] * bs, None)
    t0 = time.perf_counter()

    def featurize(ids: torch.Tensor) -> list[dict]:         # the frozen prefix, computed once for both runs
        out = []
        for b in range(0, ids.shape[0], bs):
            x = ids[b:b + bs]
            out.append({"inputs_embeds": frozen_prefix_hidden(model, x, n_frozen), "labels": x})
        return out

    train, val = featurize(train_ids), featurize(val_ids)
    prefix_seconds = time.perf_counter() - t0
    print(f"frozen prefix ({n_frozen} blocks) on {len(train) + len(val)} batches: {prefix_seconds:.1f}s", flush=True)
    runs: dict[str, dict] = {}
    for impl in (c["baseline"], c["impl"]):
        suffix = trainable_suffix(model, n_frozen)
        trainable = freeze_all_but_last(suffix, c["trainable_blocks"])
        evaluator = CausalLMFineTune(suffix, impl=impl, chunk_size=c["chunk_size"])
        val_before = evaluator.evaluate(val)
        t1 = time.perf_counter()
        module = fine_tune(suffix, train, impl, c["steps"], c["lr"], seed=p["seed"],
                           weight_decay=c["weight_decay"], chunk_size=c["chunk_size"],
                           logger=ctx.lightning_logger(f"convergence/{impl}"), progress=False)
        train_seconds = time.perf_counter() - t1
        runs[impl] = {"losses": module.step_losses, "val_before": val_before, "val_after": module.evaluate(val),
                      "seconds": train_seconds, "sec_per_step": train_seconds / c["steps"],
                      "trainable_params": sum(pp.numel() for pp in suffix.parameters() if pp.requires_grad),
                      "trainable": trainable}
        print(f"{impl}: loss {module.step_losses[0]:.4f} → {module.step_losses[-1]:.4f}, val "
              f"{val_before:.4f} → {runs[impl]['val_after']:.4f}, {train_seconds:.1f}s", flush=True)
    base, ours = runs[c["baseline"]], runs[c["impl"]]
    ma_b, ma_o = moving_average(base["losses"]), moving_average(ours["losses"])
    summary = {"max_abs_gap": max(abs(a - b) for a, b in zip(base["losses"], ours["losses"])),
               "max_ma10_gap": max(abs(a - b) for a, b in zip(ma_b, ma_o)),
               "final_ma10_baseline": ma_b[-1], "final_ma10_ours": ma_o[-1],
               "final_rel_diff": abs(ma_o[-1] - ma_b[-1]) / abs(ma_b[-1]),
               "val_after_baseline": base["val_after"], "val_after_ours": ours["val_after"],
               "val_before": base["val_before"], "prefix_seconds": prefix_seconds,
               "stage_seconds": time.perf_counter() - t_start}
    ctx.log_metrics(summary)
    for impl, r in runs.items():
        ctx.cell(f"convergence/{impl}", {"val_before": r["val_before"], "val_after": r["val_after"],
                                         "final_loss": r["losses"][-1], "seconds": r["seconds"]}, {"impl": impl})
    rows = []
    for impl, r in runs.items():
        ma = moving_average(r["losses"])
        for step in range(9, len(ma), 10):
            rows.append({"step": step + 1, "impl": impl, "loss": r["losses"][step], "loss_ma10": ma[step]})
    n_params = runs[c["impl"]]["trainable_params"]
    return {"convergence.json": {
        "title": "Convergence — fine-tuning with the baseline loss vs ours (same module, seed, data order)",
        "table_ref": "§5 (training convergence)",
        "setting": (f"{p['model']} on Shakespeare train, {c['distinct_batches']} batches of {bs}×{T} tokens cycled "
                    f"for {c['steps']} steps, AdamW lr {c['lr']} (linear decay), fp32 on CPU; blocks 0–{n_frozen - 1} "
                    f"+ tied embedding/head frozen, last {c['trainable_blocks']} blocks + final norm trained "
                    f"({n_params / 1e6:.2f}M params; frozen-prefix features computed once). Baseline `{c['baseline']}` "
                    f"= HF full-logits loss; ours `{c['impl']}`"
                    + (f" (chunk {c['chunk_size']} tokens, exact, no gradient filtering)"
                       if c["impl"] == "torch_chunked" else "") +
                    f". Validation: {c['val_batches']}×{bs}×{T} tokens of the validation split."),
        "columns": [["step", "step"], ["impl", "impl"], ["loss", "train loss"], ["loss_ma10", "10-step mean"]],
        "rows": rows,
        "plot": {"x": "step", "y": "loss_ma10", "series": "impl", "xlabel": "step",
                 "ylabel": "train loss (10-step mean, nats)"},
        "summary": summary,
        "curves": {impl: r["losses"] for impl, r in runs.items()},
        "timing": {impl: {"seconds": r["seconds"], "sec_per_step": r["sec_per_step"]} for impl, r in runs.items()},
        "claims": _convergence_claims(summary, c["impl"]),
        "notes": [f"final 10-step mean loss: baseline {summary['final_ma10_baseline']:.4f}, ours "
                  f"{summary['final_ma10_ours']:.4f}; max per-step |gap| {summary['max_abs_gap']:.2e} nats",
                  f"validation loss {summary['val_before']:.4f} before → baseline {summary['val_after_baseline']:.4f}, "
                  f"ours {summary['val_after_ours']:.4f} after",
                  "The batches repeat every "
                  f"{c['distinct_batches']} steps, so the training loss falls partly by memorisation; the claim is "
                  "about the two curves matching, not about the loss level."]}}


def _convergence_claims(summary: dict, impl: str) -> list[dict]:
    """Fixed rule: the curves match iff the 10-step moving averages never differ by more than MAX_MA_GAP_NATS and
    the final moving averages agree within FINAL_REL_TOL. 'reproduced' only for the CCE kernel (``triton``); with
    the exact unfiltered ``torch_chunked`` path a match is 'partially reproduced' (filtering untested)."""
    match = summary["max_ma10_gap"] < MAX_MA_GAP_NATS and summary["final_rel_diff"] < FINAL_REL_TOL
    verdict = ("reproduced" if impl == "triton" else "partially reproduced") if match else "not reproduced"
    return [{"id": "convergence_matches_baseline",
             "ours": f"max |Δ| of 10-step means {summary['max_ma10_gap']:.2e} nats; final {summary['final_ma10_ours']:.4f}"
                     f" vs {summary['final_ma10_baseline']:.4f} ({summary['final_rel_diff']:.2e} rel.); val "
                     f"{summary['val_after_ours']:.4f} vs {summary['val_after_baseline']:.4f}",
             "verdict": verdict,
             "note": (f"rule: max MA10 gap < {MAX_MA_GAP_NATS} nats and final within {FINAL_REL_TOL:.0%}; impl={impl}"
                      + ("; CPU runs the exact token-chunked path (no gradient filtering): the filtered Triton "
                         "kernel's effect on convergence needs a GPU" if impl != "triton" else ""))}]


if __name__ == "__main__":
    raise SystemExit(main())
