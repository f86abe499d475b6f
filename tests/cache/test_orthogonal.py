"""shared.cache.orthogonal: Cayley/PCA bases, exactness at full rank, nesting, latent cache, bytes, fold, errors."""
from __future__ import annotations

import warnings

import pytest
import torch

from shared.cache.base import CompressedCache, attach, record_prefill
from papers.matryoshka_kv.module import channel_split, fold_values, kv_statistics, sample_ranks
from shared.cache.base import routed_attention
from shared.cache.orthogonal import (KVProjection, budget_of, cayley, check_budget, check_ranks,
                                     empty_matryoshka_cache, inverse_cayley, matryoshka_cache, pca_basis, project,
                                     project_kv, uniform_ranks)
from shared.kv_eval import decode_through, evaluate_methods
from shared.tasks.base import PromptCase

L, H, D = 2, 2, 16  # tiny_llama: 2 layers, 2 KV heads (4 query heads), head_dim 16


def _ids(seed=0, B=2, T=24):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def projection(tiny_llama):
    stats = kv_statistics(tiny_llama, [_ids(1, 4, 32), _ids(2, 4, 32)], progress=False)
    return KVProjection.from_statistics(stats)


def _random_projection(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = KVProjection(L, H, D)
    with torch.no_grad():
        for t in (p.x_k, p.x_v, p.mu_k, p.mu_v):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return p


# ---- Cayley / PCA ------------------------------------------------------------------------------------------
def test_cayley_is_orthogonal_for_random_X():
    X = torch.randn(5, 64, 64, generator=torch.Generator().manual_seed(0))
    U = cayley(X)
    assert U.dtype == torch.float32
    err = (U.mT @ U - torch.eye(64)).abs().max()
    assert err < 1e-5
    assert torch.allclose(torch.linalg.det(U.double()), torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_inverse_cayley_roundtrip_on_pca_bases():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(6, 32, 200, generator=g, dtype=torch.float64)
    cov = M @ M.mT / 200
    U = pca_basis(cov)
    assert torch.all(torch.linalg.det(U) > 0)
    evals = torch.einsum("hdi,hde,hei->hi", U, cov, U)
    assert torch.all(evals[:, :-1] >= evals[:, 1:] - 1e-12), "columns must be sorted by descending eigenvalue"
    assert torch.allclose(U.mT @ cov @ U, torch.diag_embed(evals), atol=1e-10)
    assert torch.allclose(cayley(inverse_cayley(U)), U, atol=1e-10)
    U32 = U.float()
    assert (cayley(inverse_cayley(U32)) - U32).abs().max() < 1e-5


def test_pca_basis_fixes_negative_determinant():
    cov = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    U = pca_basis(cov)
    assert torch.linalg.det(U) > 0
    assert torch.allclose(U.abs(), torch.eye(3, dtype=torch.float64))


def test_inverse_cayley_warns_near_eigenvalue_minus_one():
    a = torch.tensor(torch.pi - 1e-7, dtype=torch.float64)   # rotation by almost π: eigenvalues ≈ −1, det +1
    U = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
    with pytest.warns(RuntimeWarning, match="cond"):
        inverse_cayley(U)


# ---- exactness at full rank --------------------------------------------------------------------------------
def test_full_rank_reproduces_base_logits_prefill(tiny_llama, projection):
    ids = _ids(3)
    ref = tiny_llama(ids).logits
    with project_kv(tiny_llama, projection):
        out = tiny_llama(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    # and a random (non-PCA) orthogonal basis with random means is exact too
    with project_kv(tiny_llama, _random_projection()):
        out2 = tiny_llama(ids).logits
    assert torch.allclose(out2, ref, atol=1e-4, rtol=1e-4)


def test_full_rank_cache_reproduces_token_by_token_decode(tiny_llama, projection):
    ids = _ids(4, B=2, T=20)
    ref = tiny_llama(ids).logits
    cache = empty_matryoshka_cache(projection, uniform_ranks(L, H, D, 1.0))
    with routed_attention(tiny_llama):
        logits = decode_through(tiny_llama, cache, ids, start_pos=0)
    assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4)


def test_dropping_query_mean_term_changes_nothing(tiny_llama):
    proj = _random_projection(3)
    ranks = uniform_ranks(L, H, D, 0.5)
    ids = _ids(5)
    with project_kv(tiny_llama, proj, ranks, keep_query_mean=True):
        with_mean = tiny_llama(ids).logits
    with project_kv(tiny_llama, proj, ranks):
        without = tiny_llama(ids).logits
    assert torch.allclose(with_mean, without, atol=1e-5, rtol=1e-5)


def test_reduced_rank_changes_outputs(tiny_llama, projection):
    ids = _ids(6)
    ref = tiny_llama(ids).logits
    with project_kv(tiny_llama, projection, uniform_ranks(L, H, D, 0.25)):
        out = tiny_llama(ids).logits
    assert (out - ref).abs().max() > 1e-3


# ---- nesting, incremental decode, mixed widths -------------------------------------------------------------
def test_matryoshka_nesting_and_truncation():
    p = _random_projection(4)
    b = p.layer(0)
    x = torch.randn(2, H, 10, D)
    full = project(x, b.u_k, b.mu_k)
    for r in (2, 6, 16):
        trunc = project(x, b.u_k[..., :r], b.mu_k)
        assert torch.allclose(trunc, full[..., :r], atol=1e-6)


def test_incremental_decode_equals_full_projected_forward_mixed_ranks(tiny_llama, projection):
    ranks = torch.tensor([[[4, 8], [16, 2]], [[10, 16], [6, 12]]])
    ids = _ids(7, B=2, T=18)
    with project_kv(tiny_llama, projection, ranks, step=2):
        ref = tiny_llama(ids).logits
    with projection.frozen():
        cache = CompressedCache([__import__("shared.cache.orthogonal", fromlist=["MatryoshkaLayer"]).MatryoshkaLayer(
            projection.layer(i), ranks[i]) for i in range(L)], method="mkv")
    with routed_attention(tiny_llama):
        # prefill 10 tokens through the projection, then decode the rest one at a time
        with attach(tiny_llama, cache):
            pre = tiny_llama(ids[:, :10], past_key_values=cache, use_cache=True).logits
        dec = decode_through(tiny_llama, cache, ids[:, 10:], start_pos=10)
    assert torch.allclose(pre, ref[:, :10], atol=1e-4, rtol=1e-4)
    assert torch.allclose(dec, ref[:, 10:], atol=1e-4, rtol=1e-4)
    # per-head widths are really stored, and bytes = Σ(r_K + r_V)·tokens·B·4
    layer0 = cache.layers[0]
    assert [t.shape[-1] for t in layer0.k_heads] == [4, 16] and [t.shape[-1] for t in layer0.v_heads] == [8, 2]
    assert cache.stored_bytes() == int(ranks.sum()) * 18 * 2 * 4
    assert cache.stored_bytes() == sum(l.analytic_bytes() for l in cache.layers)


def test_matryoshka_builder_in_evaluate_methods(tiny_llama, projection):
    cases = [PromptCase("toy", _ids(8, 1, 16)[0].tolist(), [5, 6], [7, 8, 9], "x") for _ in range(2)]
    builders = {"mkv_full": matryoshka_cache(tiny_llama, projection, uniform_ranks(L, H, D, 1.0)),
                "mkv_half": matryoshka_cache(tiny_llama, projection, uniform_ranks(L, H, D, 0.5))}
    with routed_attention(tiny_llama):
        rows = evaluate_methods(tiny_llama, cases, builders, batch_size=2)
    by = {(r["method"], r["case"]): r for r in rows}
    assert by[("mkv_full", 0)]["kl"] < 1e-6
    assert by[("mkv_half", 0)]["kl"] > 1e-4
    assert by[("mkv_half", 0)]["bytes"] * 2 == by[("full", 0)]["bytes"]
    assert by[("mkv_full", 0)]["bytes"] == by[("full", 0)]["bytes"]


def test_record_keeps_input_ids(tiny_llama):
    ids = _ids(9)
    assert torch.equal(record_prefill(tiny_llama, ids).input_ids, ids)


# ---- fold --------------------------------------------------------------------------------------------------
def test_fold_values_into_wv_wo_is_exact():
    torch.manual_seed(0)
    d_model, Hq, n_rep, T = 32, 4, 2, 7
    p = _random_projection(5)
    b = p.layer(1)
    r_v = torch.tensor([6, 12])
    W_v, W_o = torch.randn(d_model, H * D), torch.randn(Hq * D, d_model)
    b_v, b_o = torch.randn(H * D), torch.randn(d_model)
    x = torch.randn(T, d_model)
    attn = torch.softmax(torch.randn(Hq, T, T), -1)
    # reference: latent values V' = (V − μ)U_r, out = attn·V'·U_rᵀ + μ, then W_o
    V = (x @ W_v + b_v).view(T, H, D)
    ref_heads = []
    for q in range(Hq):
        h = q // n_rep
        U = b.u_v[h, :, :r_v[h]]
        ref_heads.append(attn[q] @ ((V[:, h] - b.mu_v[h]) @ U) @ U.T + b.mu_v[h])
    ref = torch.cat(ref_heads, -1) @ W_o + b_o
    Wv2, bv2, Wo2, bo2 = fold_values(W_v, b_v, W_o, b_o, b, r_v, n_rep)
    Vl = x @ Wv2 + bv2
    offs = [0, 6]
    heads = [attn[q] @ Vl[:, offs[q // n_rep]:offs[q // n_rep] + int(r_v[q // n_rep])] for q in range(Hq)]
    out = torch.cat(heads, -1) @ Wo2 + bo2
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


# ---- ranks, budgets, sampler, errors ------------------------------------------------------------------------
def test_budget_and_channel_split():
    r = uniform_ranks(30, 3, 64, 0.375)
    assert int(r[0, 0, 0]) == 24 and budget_of(r, 64) == pytest.approx(0.375)
    r[..., 1] = 32
    assert channel_split(r, 64) == {"key_fraction": pytest.approx(0.375), "value_fraction": pytest.approx(0.5)}


@pytest.mark.parametrize("bad", [0, -8, 72, 12])
def test_bad_ranks_raise_naming_value(bad):
    r = uniform_ranks(2, 2, 64, 0.5)
    r[1, 0, 1] = bad
    with pytest.raises(ValueError, match=str(bad)):
        check_ranks(r, 64)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, True])
def test_bad_budgets_raise_naming_value(bad):
    with pytest.raises(ValueError, match="budget"):
        check_budget(bad)
    with pytest.raises(ValueError):
        uniform_ranks(2, 2, 64, bad)


def test_off_grid_budget_raises():
    with pytest.raises(ValueError, match="0.3"):
        uniform_ranks(2, 2, 64, 0.3)


def test_sampler_uniform_independent_reproducible():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_ranks(30, 3, 64, g) for _ in range(400)])        # [N, L, H, 2]
    vals = draws.flatten()
    assert set(vals.unique().tolist()) == {8, 16, 24, 32, 40, 48, 56, 64}
    counts = torch.bincount(vals // 8 - 1, minlength=8).double()
    expected = vals.numel() / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, chi2   # chi-square, 7 dof, p = 0.001
    # independence: K and V ranks of the same head are uncorrelated; neighbouring heads too
    flat = draws.flatten(1).double()                                              # [N, 180]
    corr = torch.corrcoef(flat.T)
    off = corr[~torch.eye(corr.shape[0], dtype=torch.bool)]
    assert off.abs().max() < 0.25 and off.abs().mean() < 0.06
    a = sample_ranks(30, 3, 64, torch.Generator().manual_seed(5))
    b = sample_ranks(30, 3, 64, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_projection_shape_mismatch_raises(tiny_llama):
    with pytest.raises(ValueError, match="kv_heads"):
        with project_kv(tiny_llama, KVProjection(2, 3, 16)):
            pass


def test_kv_statistics_match_direct_computation(tiny_llama):
    ids = _ids(10, 2, 12)
    stats = kv_statistics(tiny_llama, [ids], progress=False)
    rec = record_prefill(tiny_llama, ids)
    k = rec.layers[1].keys[:, 0].reshape(-1, D).double()
    assert torch.allclose(stats["mean_k"][1, 0], k.mean(0), atol=1e-6)
    assert torch.allclose(stats["cov_k"][1, 0], torch.cov(k.T, correction=0), atol=1e-6)
    assert int(stats["tokens"]) == 24


def test_gradients_reach_only_projection(tiny_llama, projection):
    proj = KVProjection.from_statistics(kv_statistics(tiny_llama, [_ids(11)], progress=False))
    with project_kv(tiny_llama, proj, uniform_ranks(L, H, D, 0.5)):
        loss = tiny_llama(_ids(12)).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert all(p.grad is None for p in tiny_llama.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with project_kv(tiny_llama, proj):
            pass


def test_projection_save_load_roundtrip(tmp_path):
    """KVProjection.save/load keep every parameter bit-exact, store metadata, and fail clearly on a wrong file."""
    import pytest
    from safetensors import safe_open
    from safetensors.torch import save_file

    from shared.cache.orthogonal import KVProjection

    torch.manual_seed(0)
    proj = KVProjection(2, 3, 8)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    path = tmp_path / "p.safetensors"
    proj.save(path, {"seed": 3})
    back = KVProjection.load(path)
    assert (back.n_layers, back.n_kv_heads, back.head_dim) == (2, 3, 8)
    for (k, a), (_, b) in zip(proj.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in back.parameters())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"seed": "3"}
    with pytest.raises(FileNotFoundError, match="matryoshka_kv"):
        KVProjection.load(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        KVProjection.load(tmp_path / "other.safetensors")
