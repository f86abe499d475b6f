"""FRUGAL paper folder: the figure checks' math, the verdict rules, params validation (the optimizers and the
harness are tested in tests/pretrain/)."""
import pytest
import torch

from papers.frugal.module import (appendix_c_toy, galore_sgdm_toy, left_subspace, principal_cosines,
                                  random_semiorthogonal)
from papers.frugal.stages import bytes_claim, paired_claim, paper


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


def _runs(a, b):
    return {"x": [{"seed": s, "final_val_ppl": v} for s, v in enumerate(a)],
            "y": [{"seed": s, "final_val_ppl": v} for s, v in enumerate(b)]}


def test_paired_claim_rule():
    assert paired_claim("c", _runs([10, 11, 12], [20, 21, 23]), "x", "y", "ppl", "")["verdict"] == "reproduced"
    assert paired_claim("c", _runs([20, 21, 23], [10, 11, 12]), "x", "y", "ppl", "")["verdict"] == "not reproduced"
    mixed = paired_claim("c", _runs([10, 22, 12], [11, 21, 13]), "x", "y", "ppl", "")
    assert mixed["verdict"] == "inconclusive" and "inconclusive at n = 3" in mixed["ours"]
    assert paired_claim("c", _runs([10], [20]), "x", "y", "ppl", "")["verdict"] == "inconclusive"


def test_bytes_claim_rule():
    ok = [{"run": "a", "state_mb": 10.0, "analytic_state_mb": 10.0}]
    assert bytes_claim(ok)["verdict"] == "reproduced"
    assert bytes_claim([{"run": "a", "state_mb": 11.0, "analytic_state_mb": 10.0}])["verdict"] == "not reproduced"


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


def test_logits_claim_rule_pairs_every_other_group_with_logits():
    from papers.frugal.stages import logits_claim

    def runs(vals):
        return [{"seed": s, "final_val_ppl": v} for s, v in enumerate(vals)]

    label = {"embeddings": "E", "norms": "N", "logits": "L"}
    res = {"E": runs([10, 11, 12]), "N": runs([10.5, 11.5, 12.5]), "L": runs([20, 21, 23])}
    assert logits_claim(res, label, {"embeddings": 0, "norms": 0, "logits": 10}, 3)["verdict"] == "reproduced"
    res["N"] = runs([30, 31, 33])                       # norms hurt more than logits in every seed
    assert logits_claim(res, label, {}, 3)["verdict"] == "not reproduced"
    res["N"] = runs([19, 22, 22])                       # mixed: inconclusive
    assert logits_claim(res, label, {}, 3)["verdict"] == "inconclusive"
