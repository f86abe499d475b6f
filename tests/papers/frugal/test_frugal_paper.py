"""FRUGAL paper folder: the figure checks' math, the per-window cases and the subspace claim, params validation (the optimizers and the
harness are tested in tests/pretrain/)."""
import pytest
import torch

from papers.frugal.module import (appendix_c_toy, galore_sgdm_toy, left_subspace, principal_cosines,
                                  random_semiorthogonal)
from papers.frugal.claims import revisits_subspace
from papers.frugal.stages import paper, window_cases


def test_principal_cosines_of_a_subspace_with_itself_are_one_and_of_orthogonal_ones_zero():
    Q = random_semiorthogonal(32, 8, 0)
    torch.testing.assert_close(principal_cosines(Q, Q), torch.ones(8, dtype=torch.float64), atol=1e-6, rtol=0)
    E = torch.eye(32)
    torch.testing.assert_close(principal_cosines(E[:, :8], E[:, 8:16]), torch.zeros(8, dtype=torch.float64))
    # rotation inside the subspace changes nothing
    R = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0]
    torch.testing.assert_close(principal_cosines(Q, Q @ R), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        principal_cosines(Q, Q[:, :4])


def test_left_subspace_is_the_top_singular_space():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 20, generator=g))[0]
    G = U[:, :3] @ torch.diag(torch.tensor([5.0, 4.0, 3.0])) @ torch.randn(3, 30, generator=g)
    assert principal_cosines(left_subspace(G, 3), U[:, :3]).min() > 1 - 1e-5
    with pytest.raises(ValueError, match="rank"):
        left_subspace(G, 0)


def test_toy_full_rank_with_period_one_is_plain_sgdm_both_ways():
    """At r = m and T = 1 both variants reduce to bias-corrected SGDM in a rotated basis: same losses."""
    W0 = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    batches = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i))[:2] for i in range(30)])
    stale = galore_sgdm_toy(W0, batches, 6, T=1000)          # one basis for the whole run: nothing goes stale
    proper = galore_sgdm_toy(W0, batches, 6, T=1000, reproject=True)
    assert stale == pytest.approx(proper, rel=1e-9)
    assert stale[-1] < stale[0]


def test_appendix_c_reprojection_ends_lower():
    rows = appendix_c_toy(repeats=2, n_iter=100)
    assert all(r["reprojected"] < r["stale"] for r in rows)


def test_window_cases_are_one_row_per_run_seed_and_window():
    res = {"x": [{"seed": s, "val_window_loss": [1.0 + s, 2.0 + s]} for s in range(3)]}
    cases = window_cases(res)
    assert len(cases) == 6 and {(c["seed"], c["case"]) for c in cases} == {(s, i) for s in range(3) for i in (0, 1)}
    assert all(c["label"] == "x" and c["val_loss"] == 1.0 + c["seed"] + c["case"] for c in cases)


def test_subspace_claim_against_random_pairs():
    fig = {"random_mean_cosines": [0.2 + 0.001 * i for i in range(99)],
           "cosines": [{"pair": "steps 20 & 25", "mean_cosine": 0.9}, {"pair": "steps 20 & 80", "mean_cosine": 0.8},
                       {"pair": "random semi-orthogonal", "mean_cosine": 0.25}]}
    assert revisits_subspace({"figures.json": fig}, None)["verdict"] == "reproduced"
    fig["cosines"][1]["mean_cosine"] = 0.25              # inside the random bulk
    assert revisits_subspace({"figures.json": fig}, None)["verdict"] == "inconclusive"
    fig["cosines"][0]["mean_cosine"] = 0.21
    assert revisits_subspace({"figures.json": fig}, None)["verdict"] == "not reproduced"
    fig["random_mean_cosines"] = fig["random_mean_cosines"][:5]
    with pytest.raises(ValueError, match="19 random pairs"):
        revisits_subspace({"figures.json": fig}, None)


def test_params_validate_and_name_unknown_runs(tmp_path):
    import yaml

    from shared.io import read_yaml
    from shared.paths import PAPERS_DIR

    p = paper.load_params()
    assert set(p.main) <= set(p.runs) and p.train.shape == "tiny"
    raw = read_yaml(PAPERS_DIR / "frugal" / "params.yaml")
    raw["main"] = ["adamw", "lion"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"\['lion'\] are not defined"):
        paper.load_params(bad)
    raw = read_yaml(PAPERS_DIR / "frugal" / "params.yaml")
    raw["runs"]["adamw"]["optimizer"] = "adam8bit"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="runs.adamw.optimizer"):
        paper.load_params(bad)
