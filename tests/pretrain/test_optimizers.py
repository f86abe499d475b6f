"""Optimizer registry of the pre-training harness (papers/frugal spec §5): GaLore-AdamW vs the official galore-torch
1.0, FRUGAL's exactness cases, split identities, refresh/reset schedule, block order, rank rule, state bytes
(measured == analytic, the 7.36M anchors), determinism and argument validation. CPU, tiny shapes."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import sys
import types

import pytest
import torch

from shared.pretrain.groups import param_groups
from papers.frugal.optimizer import (FRUGAL, block_schedule, build_coordinates, build_subspace, project_down,
                                     project_up, residual)
from optim_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from optim_helpers import assert_same_params, batches, max_abs_diff, set_grads, synthetic_grads, tiny_model, train
from shared.pretrain.optim import MB, GaLoreAdamW, analytic_state_bytes, build_optimizer, state_bytes

BETAS = (0.9, 0.999)




# ----------------------------------------------------------------------------------------------------- helpers
def official_galore_adamw():
    """``galore_torch.adamw.AdamW`` (PyPI galore-torch 1.0) without running the package ``__init__``, which imports
    bitsandbytes; the two pure-torch modules are loaded under a private package name."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch not installed (pip install --no-deps galore-torch==1.0)")
    name = "_galore_torch_official"
    if name + ".adamw" not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg
        importlib.import_module(name + ".adamw")
    return sys.modules[name + ".adamw"].AdamW


def official_groups(model, **galore):
    g = param_groups(model)
    return [{"params": [p for _, p in g.regular]}, {"params": [p for _, p in g.linear], **galore}]


# ------------------------------------------------------------------------------------------ GaLore vs official
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_equals_galore_torch(proj_type):
    """10 steps, T = 3 (refreshes at 0, 3, 6, 9), rank 8, α 0.25, weight decay on, identical batches."""
    Official = official_galore_adamw()
    ours_m, ref_m = tiny_model(), tiny_model()
    ours = build_optimizer("galore", ours_m, lr=1e-2, weight_decay=0.1, rank=8, update_proj_gap=3, scale=0.25,
                           proj_type=proj_type)
    ref = Official(official_groups(ref_m, rank=8, update_proj_gap=3, scale=0.25, proj_type=proj_type),
                   lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)
    data = batches(10)
    for ids in data:
        train(ours_m, ours, [ids])
        train(ref_m, ref, [ids])
        assert_same_params(ours_m, ref_m, rtol=1e-6, atol=1e-7)
    diff = max_abs_diff(ours_m, ref_m)
    print(f"GaLore ({proj_type}) vs galore-torch 1.0 after 10 steps: max |diff| = {diff:.3e}")
    # moments on the projected gradient were never reset: step counters ran through all refreshes
    lin = param_groups(ours_m).linear[0][1]
    assert ours.state[lin]["step"] == 10 and ours.state[lin]["exp_avg"].shape[1 if proj_type == "std" else 0] == 8
    # the projected side: 32×32 "std" -> right (P is r×n), rank 8
    assert ours.state[lin]["ortho"].shape == ((8, 32) if proj_type == "std" else (32, 8))


def test_frugal_galore_baseline_equals_galore_torch_up_to_eps():
    """FRUGAL's GaLore baseline (README at c7ebe4c: svd, reset off, rule "no", s_proj = α) is GaLore; the only
    difference is where ε enters, so with ε = 0 (and λ = 0: decay before vs after) they agree."""
    Official = official_galore_adamw()
    m1, m2 = tiny_model(), tiny_model()
    fr = build_optimizer("frugal", m1, lr=1e-2, proj="svd", density=0.25, update_gap=3, reset_statistics=False,
                         state_free="none", proj_lr_scale=0.25, eps=0.0)
    ga = Official(official_groups(m2, rank=8, update_proj_gap=3, scale=0.25, proj_type="std"), lr=1e-2, eps=0.0,
                  no_deprecation_warning=True)
    for grads in synthetic_grads(m1, 8):
        for m, o in ((m1, fr), (m2, ga)):
            set_grads(m, grads)
            o.step()
    assert_same_params(m1, m2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- FRUGAL exactness cases
@pytest.mark.parametrize("proj", ["blockwise", "columns", "rows", "randk"])
def test_frugal_rho1_equals_adamw(proj):
    """ρ = 1 with no refresh after step 0: FRUGAL's Adam (AD:86-106) is torch.optim.AdamW's convention."""
    m1, m2 = tiny_model(), tiny_model()
    fr = build_optimizer("frugal", m1, lr=1e-3, weight_decay=0.1, proj=proj, density=1.0, update_gap=100)
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-3, weight_decay=0.1, betas=BETAS, eps=1e-8, foreach=False)
    for grads in synthetic_grads(m1, 5):
        for m, o in ((m1, fr), (m2, ref)):
            set_grads(m, grads)
            o.step()
        assert_same_params(m1, m2)


@pytest.mark.parametrize("kind", ["svd", "random"])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_frugal_rotated_rho1_is_adam_in_rotated_basis(kind, shape):
    """ρ = 1 SVD/random FRUGAL = Adam on R = G·Pᵀ (right) / Pᵀ·G (left) with P fixed at step 0 — not plain Adam."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * (1 + torch.arange(shape[1])) for _ in range(6)]
    W = torch.nn.Parameter(w0.clone())
    opt = FRUGAL([{"params": [W], "projectable": True}], lr=1e-2, proj=kind, density=1.0, update_gap=100)
    W.grad = grads[0].clone()
    opt.step()
    st = opt.state[W]
    P = st["ortho"].clone()
    right = shape[0] >= shape[1]
    assert st["right"] == right
    if kind == "svd":
        U, _, Vh = torch.linalg.svd(grads[0], full_matrices=False)
        torch.testing.assert_close(P, Vh if right else U)
    rot = (lambda g: g @ P.t()) if right else (lambda g: P.t() @ g)
    lift = (lambda r: r @ P) if right else (lambda r: P @ r)
    Z = torch.nn.Parameter(torch.zeros(rot(w0).shape))
    ref = torch.optim.AdamW([Z], lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.0, foreach=False)
    plain = torch.nn.Parameter(w0.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.0, foreach=False)
    for k, g in enumerate(grads):
        if k:
            W.grad = g.clone()
            opt.step()
        Z.grad = rot(g)
        ref.step()
        plain.grad = g.clone()
        plain_opt.step()
        torch.testing.assert_close(W.detach(), w0 + lift(Z.detach()), rtol=1e-5, atol=1e-6)
    assert (W - plain).abs().max() > 1e-3       # Adam is not rotation invariant


@pytest.mark.parametrize("proj", ["blockwise", "columns", "svd", "random"])
def test_frugal_rho0_is_signsgd_on_linear_adamw_elsewhere(proj):
    lr, wd = 1e-3, 0.1
    m1, m2 = tiny_model(), tiny_model()
    fr = build_optimizer("frugal", m1, lr=lr, weight_decay=wd, proj=proj, density=0.0, update_gap=2)
    groups1, groups2 = param_groups(m1), param_groups(m2)
    ref = torch.optim.AdamW([p for _, p in groups2.regular], lr=lr, weight_decay=wd, betas=BETAS, eps=1e-8,
                            foreach=False)
    for grads in synthetic_grads(m1, 3):
        set_grads(m1, grads)
        set_grads(m2, grads)
        fr.step()
        ref.step()
        with torch.no_grad():
            for n, p in groups2.linear:            # exactly W(1 − ηλ) − η·sign(G)
                p.mul_(1 - lr * wd).add_(-lr * grads[n].sign())
        for (n, a), (_, b) in zip(groups1.linear, groups2.linear):
            assert torch.equal(a, b), n
        for (n, a), (_, b) in zip(groups1.regular, groups2.regular):
            torch.testing.assert_close(a, b, msg=n)
    assert state_bytes(fr, groups1)["linear"] == 0


# -------------------------------------------------------------------------------------------- split identities
@pytest.mark.parametrize("kind", ["svd", "random", "randperm", "columns", "rows", "randk"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("rho", [0.25, 0.5])
def test_split_identities(kind, shape, rho):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(shape, generator=gen)
    if kind in ("svd", "random", "randperm"):
        state = build_subspace(kind, G, rho, "std", gen)
    else:
        state = build_coordinates(kind, G, rho, gen)
    full = project_up(kind, state, project_down(kind, state, G), shape)
    free = residual(kind, state, G)
    torch.testing.assert_close(full + free, G, rtol=0, atol=1e-5)
    if kind in ("svd", "random", "randperm"):
        P = state["ortho"]
        torch.testing.assert_close(P @ P.t() if state["right"] else P.t() @ P,
                                   torch.eye(min(P.shape)), atol=1e-5, rtol=0)
        assert abs((full * free).sum().item()) < 1e-4 * G.square().sum().item()      # orthogonal parts
        assert project_down(kind, state, free).abs().max() < 1e-5
        assert full.norm() > 0 and free.norm() > 0
    else:
        assert torch.equal(full + free, G)
        assert not ((full != 0) & (free != 0)).any()                                  # disjoint supports
        assert (full != 0).sum() > 0 and (free != 0).sum() > 0


def test_blockwise_split_is_a_partition_of_tensors():
    m = tiny_model()
    opt = build_optimizer("frugal", m, lr=1e-3, density=0.25, block_order="random")
    set_grads(m, synthetic_grads(m, 1)[0])
    opt.step()
    lin = [p for _, p in param_groups(m).linear]
    active = [opt.state[p]["active"] for p in lin]
    assert sum(active) == round(0.25 * len(lin)) == 4
    for p, a in zip(lin, active):
        has_tensors = any(isinstance(v, torch.Tensor) for v in opt.state[p].values())
        assert has_tensors == a          # inactive tensors hold no state at all


# -------------------------------------------------------------------------------------- refresh / reset / order
@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("kind", ["columns", "svd"])
def test_refresh_every_T_and_reset_iff_flag(reset, kind):
    T, steps, b1 = 3, 8, BETAS[0]
    gen = torch.Generator().manual_seed(5)
    W = torch.nn.Parameter(torch.randn(10, 6, generator=gen))
    opt = FRUGAL([{"params": [W], "projectable": True}], lr=1e-2, proj=kind, density=0.5, update_gap=T,
                 reset_statistics=reset)
    key = "indices" if kind == "columns" else "ortho"
    prev = None
    for k in range(1, steps + 1):
        W.grad = torch.randn(10, 6, generator=gen)
        opt.step()
        st = opt.state[W]
        refreshed = (k - 1) % T == 0
        if prev is not None:
            assert (not torch.equal(prev, st[key])) == refreshed, k
        prev = st[key].clone()
        assert st["step"] == (((k - 1) % T) + 1 if reset else k)
        fresh = (1 - b1) * project_down(kind, st, W.grad)
        if refreshed and k > 1:
            assert torch.equal(st["exp_avg"], fresh) == reset, k


@pytest.mark.parametrize("reset", [True, False])
def test_blockwise_reset_iff_flag(reset):
    m = tiny_model()
    opt = build_optimizer("frugal", m, lr=1e-3, density=1.0, update_gap=2, reset_statistics=reset)
    lin = param_groups(m).linear[0][1]
    for k, grads in enumerate(synthetic_grads(m, 5), start=1):
        set_grads(m, grads)
        opt.step()
        assert opt.state[lin]["step"] == (((k - 1) % 2) + 1 if reset else k)


@pytest.mark.parametrize("order", ["descending", "ascending", "mirror"])
def test_blocks_visit_every_linear_tensor_within_ceil_inv_rho_refreshes(order):
    m = tiny_model()
    opt = build_optimizer("frugal", m, lr=1e-3, density=0.25, update_gap=1, block_order=order)
    lin = [p for _, p in param_groups(m).linear]
    n, k = len(lin), round(0.25 * len(lin))
    seen, first = set(), None
    for grads in synthetic_grads(m, 4):                 # ⌈1/ρ⌉ = 4 refreshes (T = 1)
        set_grads(m, grads)
        opt.step()
        active = {i for i, p in enumerate(lin) if opt.state[p]["active"]}
        assert len(active) == k
        first = active if first is None else first
        seen |= active
    assert seen == set(range(n))
    if order == "descending":
        assert first == set(range(n - k, n))            # the top layer's tensors first
    # the 7.36M tiny model: 28 tensors, ρ 0.25 -> 7 = one whole layer per refresh, all within 4 refreshes
    cursor, cover = None, set()
    for r in range(4):
        idx, cursor = block_schedule("descending", 28, 7, cursor)
        assert idx == list(range(21 - 7 * r, 28 - 7 * r))
        cover |= set(idx)
    assert cover == set(range(28))


def test_rank_is_round_rho_side():
    gen = torch.Generator().manual_seed(0)
    for shape, want in [((256, 256), (64, 256)), ((688, 256), (64, 256)), ((256, 688), (256, 64))]:
        st = build_subspace("svd", torch.randn(shape, generator=gen), 0.25, "std", gen)   # d_model / 4
        assert tuple(st["ortho"].shape) == want
    for shape, rho in [((30, 10), 0.25), ((10, 30), 0.35), ((24, 24), 0.3)]:
        st = build_subspace("random", torch.randn(shape, generator=gen), rho, "std", gen)
        assert min(st["ortho"].shape) == round(rho * min(shape))
    m = tiny_model()
    opt = build_optimizer("frugal", m, lr=1e-3, proj="svd", density=0.25)
    set_grads(m, synthetic_grads(m, 1)[0])
    opt.step()
    for _, p in param_groups(m).linear:
        assert min(opt.state[p]["ortho"].shape) == round(0.25 * min(p.shape)) == 8


# ------------------------------------------------------------------------------------------------- state bytes
CONFIGS = [
    ("adamw", {}),
    ("galore", {"rank": 8, "update_proj_gap": 2}),
    ("galore", {"rank": 8, "update_proj_gap": 2, "proj_type": "reverse_std"}),
    ("galore", {"rank": 4, "update_proj_gap": 2, "proj_type": "full"}),
    ("frugal", {"update_gap": 2}),
    ("frugal", {"update_gap": 2, "block_order": "random"}),
    ("frugal", {"update_gap": 2, "block_order": "ascending"}),
    ("frugal", {"update_gap": 2, "block_order": "mirror"}),
    ("frugal", {"update_gap": 2, "density": 0.0}),
    ("frugal", {"update_gap": 2, "proj": "columns"}),
    ("frugal", {"update_gap": 2, "proj": "rows", "reset_statistics": False}),
    ("frugal", {"update_gap": 2, "proj": "randk"}),
    ("frugal", {"update_gap": 2, "proj": "svd"}),
    ("frugal", {"update_gap": 2, "proj": "random", "proj_side": "reverse_std"}),
    ("frugal", {"update_gap": 2, "proj": "randperm"}),
    ("frugal", {"update_gap": 2, "proj": "svd", "density": 0.0}),
]


@pytest.mark.parametrize("name,params", CONFIGS, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in CONFIGS])
def test_measured_state_bytes_equal_analytic(name, params):
    m = tiny_model()
    opt = build_optimizer(name, m, lr=1e-3, **params)
    groups = param_groups(m)
    for k, grads in enumerate(synthetic_grads(m, 5)):     # steps 1-5 include two refreshes (T = 2)
        set_grads(m, grads)
        opt.step()
        want = analytic_state_bytes(name, m, refresh=k // 2, **params)
        assert state_bytes(opt, groups) == want, k
    assert state_bytes(opt) == want                        # from the optimizer's own group tags


@pytest.fixture(scope="module")
def tiny_7m():
    """The spec's CPU ``tiny`` model: vocab 8192, 256/688/4 heads/4 layers, untied (7.36M params) + one grad."""
    m = tiny_model(vocab=8192, hidden=256, inter=688, heads=4, layers=4)
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return m


@pytest.mark.parametrize("name,params,anchor_mb", [
    ("adamw", {}, 58.9),
    ("galore", {"rank": 64}, 41.7),
    ("frugal", {"proj": "blockwise", "density": 0.25, "block_order": "descending"}, 39.9),
    ("frugal", {"density": 0.0}, 33.6),
])
def test_state_byte_anchors_on_the_7m_tiny_model(tiny_7m, name, params, anchor_mb):
    m = tiny_7m
    assert sum(p.numel() for p in m.parameters()) == 7_358_720
    groups = param_groups(m)
    assert groups.numel("linear") == 3_162_112 and len(groups.linear) == 28
    opt = build_optimizer(name, m, lr=1e-3, **params)
    opt.step()
    got = state_bytes(opt, groups)
    assert got == analytic_state_bytes(name, m, **params)
    assert round(got["total"] / MB, 1) == anchor_mb
    print(f"{name} {params}: {got['total'] / MB:.3f} MB (linear {got['linear'] / MB:.3f} MB)")
    if name == "frugal" and params["density"] == 0.0:      # Adam bytes of embeddings + head + norms only
        assert got["linear"] == 0 and got["total"] == 2 * 4 * groups.numel("regular")


# ------------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("params", [{"block_order": "random", "update_gap": 2}, {"proj": "randk", "update_gap": 2},
                                    {"proj": "random", "update_gap": 2}])
def test_determinism_and_checkpoint_resume(params):
    data = batches(6)

    def run(seed, global_seed, resume_at=None):
        torch.manual_seed(global_seed)                         # global RNG must not matter
        m = tiny_model()
        opt = build_optimizer("frugal", m, lr=1e-3, seed=seed, **params)
        if resume_at is None:
            train(m, opt, data)
            return m
        train(m, opt, data[:resume_at])
        ckpt = copy.deepcopy((m.state_dict(), opt.state_dict()))
        m2 = tiny_model(seed=7)
        m2.load_state_dict(ckpt[0])
        opt2 = build_optimizer("frugal", m2, lr=1e-3, seed=seed + 99, **params)
        opt2.load_state_dict(ckpt[1])
        train(m2, opt2, data[resume_at:])
        return m2

    a, b = run(0, 1), run(0, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = run(1, 1)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    d = run(0, 3, resume_at=3)
    assert_same_params(a, d, rtol=0, atol=0)


def test_galore_deterministic():
    ms = []
    for _ in range(2):
        m = tiny_model()
        train(m, build_optimizer("galore", m, lr=1e-2, rank=8, update_proj_gap=2), batches(4))
        ms.append(m)
    assert_same_params(*ms, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name,params,bad", [
    ("sgdx", {}, "sgdx"),
    ("frugal", {"densityy": 0.5}, "densityy"),
    ("adamw", {"rank": 8}, "rank"),
    ("frugal", {"density": 1.5}, 1.5),
    ("frugal", {"density": -0.1}, -0.1),
    ("frugal", {"update_gap": 0}, 0),
    ("frugal", {"update_gap": -3}, -3),
    ("galore", {"update_proj_gap": 0}, 0),
    ("galore", {"rank": 0}, 0),
    ("galore", {"proj_type": "diagonal"}, "diagonal"),
    ("frugal", {"state_free": "adam"}, "adam"),
    ("frugal", {"inactive_update_rule": "lion"}, "lion"),
    ("frugal", {"proj": "fourier"}, "fourier"),
    ("frugal", {"block_order": "sideways"}, "sideways"),
    ("frugal", {"proj_side": "top"}, "top"),
    ("frugal", {"block_order": "mirror", "density": 0.5}, "7"),   # 14 tensors -> 7 active: odd
])
def test_value_errors_name_the_value(name, params, bad):
    m = tiny_model()
    pattern = re.escape(repr(bad)) if not isinstance(bad, str) or bad != "7" else r"\b7\b"
    with pytest.raises(ValueError, match=pattern):
        build_optimizer(name, m, lr=1e-3, **params)
    with pytest.raises(ValueError, match=pattern):
        analytic_state_bytes(name, m, **params)


def test_classes_validate_outside_the_registry():
    W = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2.0"):
        FRUGAL([{"params": [W], "projectable": True}], density=2.0)
    with pytest.raises(ValueError, match="'nope'"):
        FRUGAL([{"params": [W], "projectable": True}], proj="nope")
    with pytest.raises(ValueError, match="-1"):
        GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": -1}])
    with pytest.raises(ValueError, match="'sign'"):
        FRUGAL([W], state_free="sign")           # bad defaults fail even without a projectable group


def test_regular_signsgd_moves_a_regular_group_to_the_state_free_rule():
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.pretrain.optim import analytic_state_bytes, build_optimizer, state_bytes

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    before = model.lm_head.weight.detach().clone()
    opt = build_optimizer("frugal", model, lr=1e-2, density=0.0, regular_signsgd=("logits",))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    g = model.lm_head.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.lm_head.weight.detach(), before - 1e-2 * g.sign())   # pure signSGD
    assert not [v for v in opt.state.get(model.lm_head.weight, {}).values() if torch.is_tensor(v)]  # no state kept
    assert state_bytes(opt)["total"] == analytic_state_bytes("frugal", model, density=0.0,
                                                             regular_signsgd=("logits",))["total"]
    with pytest.raises(ValueError, match="regular_signsgd"):
        build_optimizer("adamw", model, lr=1e-3, regular_signsgd=("logits",))
    with pytest.raises(ValueError, match="regular_signsgd"):
        build_optimizer("frugal", model, lr=1e-3, regular_signsgd=("heads",))
