import pytest
import torch

from papers.cskv.module import (LayerwiseLowRank, activation_stats, init_factors, reconstruction_error,
                                train_factors)
from papers.cskv.stages import density, factor_name, needed_factor_sets, paper
from shared.cache.decompose import factorize


@pytest.fixture(scope="module")
def problem():
    """Correlated inputs (as real activations are) so that whitening matters."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)
    X = (torch.randn(2, 512, 32, generator=g) @ mix) + 0.3 * torch.randn(32, generator=g)
    W = torch.randn(2, 32, 16, generator=g)
    return X, W


def test_training_loss_decreases(problem):
    X, W = problem
    init = init_factors(W, activation_stats(X), 0.25, 8, 2, "svd", per_head=False)
    before = LayerwiseLowRank(W, init, "k").loss(X).item()
    _, module = train_factors(X, W, init, "k", steps=60, seq_len=64, lr=1e-2, progress=False)
    assert module.loss(X).item() < 0.9 * before


def test_closed_form_optimum_le_trained_le_svd_init(problem):
    X, W = problem
    stats = activation_stats(X)
    svd = init_factors(W, stats, 0.25, 8, 2, "svd", per_head=False)
    whitened = init_factors(W, stats, 0.25, 8, 2, "whitened", per_head=False)
    trained, _ = train_factors(X, W, svd, "k", steps=100, seq_len=64, lr=1e-2, progress=False)
    e_svd, e_tr, e_wh = (reconstruction_error(X, W, f) for f in (svd, trained, whitened))
    assert e_wh <= e_tr + 1e-6 and e_tr <= e_svd, (e_wh, e_tr, e_svd)


def test_qat_training_runs_and_keeps_shapes(problem):
    X, W = problem
    init = init_factors(W, activation_stats(X), 0.5, 8, 2, "asvd", per_head=True)
    f, module = train_factors(X, W, init, "v", steps=3, seq_len=64, lr=1e-3, qat=True, progress=False)
    assert f[0].A.shape == init[0].A.shape and module.A.grad is not None


def test_unknown_kind_and_bad_steps_raise(problem):
    X, W = problem
    init = [factorize(W[l], 4, 1, "svd") for l in range(2)]
    with pytest.raises(ValueError, match="kind"):
        LayerwiseLowRank(W, init, "q")
    with pytest.raises(ValueError, match="steps"):
        train_factors(X, W, init, "k", steps=0, seq_len=64, lr=1e-3)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(ddp_ranks):
    r0, r1 = ddp_ranks("papers.cskv.ddp_check")
    assert torch.equal(r0["A"], r1["A"]) and torch.equal(r0["B"], r1["B"])


def test_factor_sets_cover_every_table_method():
    p = paper.load_params()
    names = {fs["name"] for fs in needed_factor_sets(p)}
    d = density(p.ablation.compression_ratio)
    assert len(p.train.seeds) >= 3                                          # trained rows: one set per seed
    assert set(p.quant.schemes) == {"official", "reprise"}                  # Table 5 runs both side by side
    for kind in ("k", "v"):
        for init in ("random", "svd", "asvd"):
            assert factor_name(kind, init, d, False, False) in names
        for s in p.train.seeds:
            for scheme in p.quant.schemes:                                   # Table 5 QAT, one set per quantizer
                assert factor_name(kind, p.train.init, d, False, True, scheme, s) in names
            for init in ("random", "svd", "asvd"):
                assert factor_name(kind, init, d, False, True, seed=s) in names
            if "cskv_per_head" in p.table1.methods:                         # Table 1's per-head rows
                for r in p.table1.compression_ratios:
                    assert factor_name(kind, p.train.init, density(r), True, True, seed=s) in names
            for r in p.sweep.compression_ratios:                            # the sweep's CSKV rows
                assert factor_name(kind, p.train.init, density(r), False, True, seed=s) in names
        for t in (p.table1, p.sweep):
            if "whitened" in t.methods:
                for r in t.compression_ratios:
                    assert factor_name(kind, "whitened", density(r), False, False) in names
    for dk, dv in p.ablation.kv_densities:
        for s in p.train.seeds:
            assert factor_name("k", p.train.init, dk, False, True, seed=s) in names
            assert factor_name("v", p.train.init, dv, False, True, seed=s) in names
    untrained = [fs for fs in needed_factor_sets(p) if not fs["trained"]]
    assert all(fs["seed"] is None and not fs["name"].endswith(tuple(f"-s{s}" for s in p.train.seeds))
               for fs in untrained)


# ---- the sweep's MatryoshkaKV rows (trained projections of the MatryoshkaKV pipeline, at equal cached bytes) ----
def _params_with(**edits):
    """The paper's params.yaml as a dict, with dotted-path ``edits``."""
    from shared.stages import read_yaml

    raw = read_yaml(paper.paper_dir() / "params.yaml")
    for path, value in edits.items():
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    return raw


def test_sweep_matryoshka_rows_need_ratios_on_the_rank_grid():
    from papers.cskv.stages import CSKVParams

    p = CSKVParams.model_validate(_params_with())
    assert p.methods["mkv"].method == "matryoshka" and "mkv" in p.sweep.methods
    assert all(abs(8 * r - round(8 * r)) < 1e-9 for r in p.sweep.compression_ratios)
    assert sum(0.2 <= r <= 0.8 for r in p.sweep.compression_ratios) >= 5          # the 0.2..0.8 range
    with pytest.raises(ValueError, match="rank grid"):
        CSKVParams.model_validate(_params_with(**{"sweep.compression_ratios": [0.2, 0.5]}))
    with pytest.raises(ValueError, match="only for method matryoshka"):
        CSKVParams.model_validate(_params_with(**{"methods.asvd": {"method": "lowrank", "factors": "asvd",
                                                                    "projection": "x"}}))


def test_sweep_matryoshka_row_loads_one_projection_per_training_seed(tmp_path):
    from types import SimpleNamespace

    from papers.cskv.stages import CSKVParams, Methods
    from shared.cache.orthogonal import KVProjection, Matryoshka

    p = CSKVParams.model_validate(_params_with(**{"train.seeds": [0, 1]}))
    saved = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        proj = KVProjection(2, 2, 16)
        with torch.no_grad():
            proj.x_k.normal_()
        proj.save(tmp_path / f"s{seed}.safetensors")
        saved[seed] = proj.x_k.detach().clone()
    ctx = SimpleNamespace(params=p, artifacts_dir=tmp_path / "artifacts")
    rows = Methods(ctx).matryoshka(str(tmp_path), 0.25)
    assert [s for s, _ in rows] == [0, 1]
    for seed, m in rows:
        assert isinstance(m, Matryoshka) and m.compression_ratio == pytest.approx(0.25)
        assert torch.equal(m.projection.x_k, saved[seed])                    # seed s ↔ s<seed>.safetensors
    picked = Methods(ctx).matryoshka(str(tmp_path), 0.25, seeds=[1])        # `seeds`: a subset of the projections
    assert [s for s, _ in picked] == [1] and torch.equal(picked[0][1].projection.x_k, saved[1])
    with pytest.raises(ValueError, match="multiple of"):                     # budget 0.8: r = 12.8, off the grid
        Methods(ctx).matryoshka(str(tmp_path), 0.2)
    ctx3 = SimpleNamespace(params=CSKVParams.model_validate(_params_with(**{"train.seeds": [0, 3]})),
                           artifacts_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="matryoshka_kv"):
        Methods(ctx3).matryoshka(str(tmp_path), 0.25)


def test_breakpoint_text_marks_a_method_that_fails_at_the_smallest_ratio():
    from papers.cskv.stages import breakpoint_text

    assert breakpoint_text(0.0, 0.125) == "< 0.125"
    assert breakpoint_text(0.25, 0.125) == "0.25"
