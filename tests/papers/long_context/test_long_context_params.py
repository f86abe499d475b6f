"""Bad settings of the two long-context pipelines fail at params validation — before any model loads — with the key
and the value named (spec papers/long_context.md; DESIGN: params are validated first)."""
from pathlib import Path

import pytest
import yaml

from shared.io import read_yaml
from shared.paths import PAPERS_DIR


def _load(paper_id: str, path: tuple, value, tmp_path: Path):
    import importlib

    p = read_yaml(PAPERS_DIR / paper_id / "params.yaml")
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(p))
    return importlib.import_module(f"papers.{paper_id}.stages").paper.load_params(bad)


@pytest.mark.parametrize("path,value,match", [
    (("c1", "lam", "n_local"), 0, r"c1.lam.n_local = 0: Input should be greater than or equal to 1"),
    (("c2", "lam", "n_global"), -1, r"c2.lam.n_global = -1: Input should be greater than or equal to 0"),
    (("c1", "buckets"), [0, 4096, 8192], r"c1.buckets must rise from 0 to c1.seq_len = 16384"),
    (("c3", "decode_tokens"), 6144, r"c3.decode_tokens = 6144 must be < c2.seq_len = 6144"),
])
def test_lm_infinite_bad_params_name_key_and_value(tmp_path, path, value, match):
    with pytest.raises(ValueError, match=match):
        _load("lm_infinite", path, value, tmp_path)


@pytest.mark.parametrize("path,value,match", [
    (("eval", "budget"), 4096, r"eval.budget = 4096 must be < eval.prefill = 4096 \(K < context\)"),
    (("methods", "ra10", "refresh_every"), 0, r"refresh_every must be an int >= 1 or None, got 0"),
    (("methods", "streaming", "n_global"), -1, r"n_global must be an int >= 0, got -1"),
    (("eval", "decode"), 250, r"eval.decode = 250 must be a multiple of eval.bins = 4"),
    (("second_model", "eval", "budget"), 8192, r"second_model.eval = .*eval.budget = 8192 must be < eval.prefill = 4096"),
    (("second_model", "modle"), "x", r"second_model.modle"),
])
def test_refreshkv_bad_params_name_key_and_value(tmp_path, path, value, match):
    with pytest.raises(ValueError, match=match):
        _load("refreshkv", path, value, tmp_path)


def test_refreshkv_keys_per_step_counts_exact_layers_as_full_reads():
    """Layers that count their reads give them; an exact (vanilla) layer reads P + t + 1 at step t."""
    from types import SimpleNamespace

    import torch

    from papers.refreshkv.stages import keys_per_step

    P, T, H = 10, 4, 2
    k = torch.zeros(1, H, 3, 8)
    counted = SimpleNamespace(keys=k, reads=[5 * H] * T)          # e.g. a sliding window of 5
    exact = SimpleNamespace(keys=k)
    assert keys_per_step(SimpleNamespace(layers=[exact, exact]), P, T) == P + (T + 1) / 2
    assert keys_per_step(SimpleNamespace(layers=[counted, counted]), P, T) == 5
    assert keys_per_step(SimpleNamespace(layers=[counted, exact]), P, T) == (5 + P + (T + 1) / 2) / 2
