"""LongBench-E loader for users with internet (THUDM/LongBench on the Hugging Face hub, via ``datasets``).

Offline this raises :class:`LongBenchUnavailable` with a clear message; the CPU pipelines never call it.
"""
from __future__ import annotations

LONGBENCH_E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                     "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")


class LongBenchUnavailable(RuntimeError):
    pass


def load_longbench_e(task: str, split: str = "test"):
    """Return the ``datasets.Dataset`` of one LongBench-E task (fields: input, context, answers, length, ...)."""
    if task not in LONGBENCH_E_TASKS:
        raise ValueError(f"unknown LongBench-E task {task!r}; expected one of {LONGBENCH_E_TASKS}")
    import datasets

    try:
        return datasets.load_dataset("THUDM/LongBench", f"{task}_e", split=split)
    except Exception as e:  # network, hub or script errors all mean "not available here"
        raise LongBenchUnavailable(
            f"LongBench-E task {task!r} could not be loaded from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e)[:200]}). It needs internet access; the embedded-model pipelines use the local generators "
            f"in shared.tasks instead."
        ) from e
