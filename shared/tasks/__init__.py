"""Evaluation tasks: seeded generators returning :class:`PromptCase` plus their scorers."""
from shared.tasks.base import ChatFrame, PromptCase, build_case, first_integer, last_integer
from shared.tasks.choice import ChoiceItem, next_line_choice, score_choice
from shared.tasks.longbench import LONGBENCH_E_TASKS, LongBenchUnavailable, load_longbench_e
from shared.tasks.longeval import lines_for_tokens, longeval_lines, score_longeval
from shared.tasks.needle import needle, score_needle
from shared.tasks.passkey import passkey, score_passkey
from shared.tasks.perplexity import corpus_ids, corpus_text, perplexity, token_windows

from shared.tasks.registry import TASKS, case_seed, make_case, make_cases, task_generator, task_scorer

__all__ = ["ChatFrame", "PromptCase", "build_case", "first_integer", "last_integer", "LONGBENCH_E_TASKS",
           "LongBenchUnavailable", "load_longbench_e", "lines_for_tokens", "longeval_lines", "score_longeval",
           "needle", "score_needle", "passkey", "score_passkey", "corpus_ids", "corpus_text", "perplexity", "token_windows", "TASKS",
           "case_seed", "make_case", "make_cases", "task_generator", "task_scorer", "ChoiceItem", "next_line_choice", "score_choice"]
