"""MatryoshkaKV parity: PCA statistics/bases, the Cayley map and its inverse, and the greedy search's decision rule
against golden outputs of the official code (github.com/The-kamisato/MatryoshkaKV-cache; files, commit and functions:
tests/golden/golden.json, generator tools/golden/make_golden.py)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import papers.matryoshka_kv.module as mkv
from shared.cache.orthogonal import KVProjection, cayley, inverse_cayley, pca_basis

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PCA = torch.load(GOLDEN / "mkv_pca.pt")
CAYLEY = torch.load(GOLDEN / "mkv_cayley.pt")
GREEDY = torch.load(GOLDEN / "mkv_greedy.pt")


class _CacheReplay(nn.Module):
    """Stands in for the model in :func:`kv_statistics`: each call writes the next golden K/V chunk into the cache."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, past_key_values, use_cache):
        ks, vs = PCA["k_chunks"][self.calls], PCA["v_chunks"][self.calls]
        self.calls += 1
        for layer, (k, v) in enumerate(zip(ks, vs)):
            past_key_values.update(k, v, layer)


@pytest.fixture(scope="module")
def stats():
    batches = [torch.zeros(1, n, dtype=torch.long) for n in PCA["chunk_lengths"]]
    return mkv.kv_statistics(_CacheReplay(), batches, progress=False)


def _match_sign(U: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return U * torch.sign((U * ref).sum(-2, keepdim=True))


@pytest.mark.parametrize("kind", ["k", "v"])
def test_mean_covariance_spectrum_and_pca_basis_match_official_up_to_column_sign(stats, kind):
    assert int(stats["tokens"]) == sum(PCA["chunk_lengths"])
    assert torch.allclose(stats[f"mean_{kind}"], PCA[f"mean_{kind}"].double(), atol=1e-6, rtol=0)
    ev = torch.linalg.eigvalsh(stats[f"cov_{kind}"]).flip(-1)            # centred (population) covariance
    assert torch.allclose(ev, PCA[f"eigenvalues_{kind}"].double(), rtol=1e-4, atol=1e-6)
    U, U_off = pca_basis(stats[f"cov_{kind}"]), PCA[f"U_{kind}_det1"].double()
    assert torch.allclose(_match_sign(U, U_off), U_off, atol=1e-4, rtol=0)     # official eigh runs in fp32
    # both bases are what the Cayley map can reach (det +1); the official reaches it by flipping column 0
    assert torch.allclose(torch.linalg.det(U), torch.ones(U.shape[:-2], dtype=U.dtype), atol=1e-9)
    assert torch.allclose(torch.linalg.det(U_off), torch.ones(U.shape[:-2], dtype=U.dtype), atol=1e-5)


def test_cayley_matches_official_orthogonal():
    assert torch.allclose(cayley(CAYLEY["X"]), CAYLEY["Q"], atol=1e-6, rtol=0)


def test_inverse_cayley_has_the_official_skew_generator_and_round_trips():
    """Official X_init = strict lower triangle of A = 2(U − I)(U + I)⁻¹; ours X = A/2 (skew). Both give the same
    A = X − Xᵀ, hence the same U = Cayley(X), and the same Adam trajectory of A (∂L/∂X = G − Gᵀ either way)."""
    U, X_off = CAYLEY["U"], CAYLEY["X_init"]
    X = inverse_cayley(U)
    assert torch.allclose(X - X.mT, X_off - X_off.mT, atol=2e-5, rtol=0)
    assert torch.allclose(cayley(X), CAYLEY["Q_roundtrip"], atol=2e-6, rtol=0)
    assert torch.allclose(cayley(X_off), CAYLEY["Q_roundtrip"], atol=1e-6, rtol=0)   # our Cayley on theirs
    assert float(X_off.triu().abs().max()) == 0.0 and float((X + X.mT).abs().max()) < 1e-6


@pytest.mark.parametrize("per_round", [1, 4])
def test_greedy_search_takes_the_official_decrements(tiny_llama, monkeypatch, per_round):
    """Our greedy_rank_search (criterion="hidden_l2", Δr = d/4, floor Δr) against the official
    update_two_result_truncate_rate on the same synthetic per-(K|V, layer, head) errors err = base·r/d, recomputed
    each round; the model's forward passes are replaced by outputs whose relative L2 to the current configuration
    is exactly that error, so only the decision rule is compared."""
    d, delta = GREEDY["head_dim"], GREEDY["interval"]
    assert delta == d // 4
    seq = GREEDY[f"ranks_update{per_round}"]                        # official ranks after each round [R, L, H, 2]
    base = GREEDY["base"]                                          # [2 (K, V), L, H]
    n_layers, n_kv = seq.shape[1:3]
    state: dict = {}
    real_project_kv = mkv.project_kv

    @contextmanager
    def recording_project_kv(*args, **kwargs):
        with real_project_kv(*args, **kwargs) as handle:
            state["handle"] = handle
            yield handle

    def capture(model, input_ids):
        state["new_round"] = True

    def forward_from(model, cap, start, final_hidden=False):
        ranks = state["handle"].ranks
        if state.pop("new_round", False):                           # the current configuration
            state["current"] = ranks.clone()
            return torch.ones(1, dtype=torch.float64)
        (l, h, kv), = (state["current"] - ranks).nonzero().tolist()
        assert start == l and state["current"][l, h, kv] - ranks[l, h, kv] == delta
        return torch.ones(1, dtype=torch.float64) + base[kv, l, h].double() * state["current"][l, h, kv] / d

    monkeypatch.setattr(mkv, "project_kv", recording_project_kv)
    monkeypatch.setattr(mkv, "capture_layer_inputs", capture)
    monkeypatch.setattr(mkv, "forward_from", forward_from)
    total = 2 * n_layers * n_kv * d
    budgets = [1 - (i + 1) * per_round * delta / total for i in range(seq.shape[0])]
    proj = KVProjection(n_layers, n_kv, d)
    ids = torch.arange(8)[None]
    res = mkv.greedy_rank_search(tiny_llama, proj, ids, budgets, delta=delta, per_round=per_round,
                                 criterion="hidden_l2", progress=False)
    ours = torch.stack([res.snapshots[b] for b in budgets])
    assert torch.equal(ours, seq)
    assert int((seq[-1] == delta).sum()) >= 1                       # the floor (skip) case was exercised
