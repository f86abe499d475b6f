"""Generate the golden files in tests/golden/ by running the *official* CSKV and MatryoshkaKV code once on seeded
small inputs. Never imported by the tests (they only read the files this writes).

Usage (official snapshots extracted with ``git -C <dir> archive HEAD | tar -x -C <path>``)::

    python tools/golden/make_golden.py --cskv /tmp/cskv_off --mkv /tmp/mkv_off \
        --cskv-commit $(git -C <cskv git dir> rev-parse HEAD) --mkv-commit $(git -C <mkv git dir> rev-parse HEAD)

How the official code is loaded (only what is needed; nothing from it is copied into the project):

* CSKV ``cskv_src/utils/quant_utils.py`` (imports only torch): imported as a module from its file.
* CSKV ``cskv_src/utils/training_utils.py`` (``init_svd``, ``init_asvd``) and ``cskv_src/scripts/asvd_init_calib.py``
  (``calib_input_distribution``): imported as modules from their files (their imports — sklearn, transformers,
  datasets — are all in the venv).
* MatryoshkaKV ``eigenvalues_decomposition.py`` (``sum_kv_states_per_head``,
  ``kv_states_per_head_convariance_decomposition``): imported from its file.
* MatryoshkaKV ``modeling_pcallama_trial.py`` (``PcaLlamaAttention.orthogonal_`` / ``inverse_orthogonal_`` /
  ``make_unitary_transform_det_1``) and ``cal_adaptive_rate.py`` (``update_two_result_truncate_rate``): these modules
  load checkpoints / a 7B model at import time, so the named functions' source is cut out with ``ast`` and executed
  unchanged in a namespace holding their free names (``torch``, ``self.dtype``, the global ``interval``).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden"


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_functions(path: Path, names: list[str], namespace: dict, class_name: str | None = None) -> dict:
    """Execute the official source of the named (module-level or ``class_name`` method) functions verbatim."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if class_name is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    found = {}
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            exec(code, namespace)
            found[node.name] = namespace[node.name]
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"{path}: functions {missing} not found")
    return found


# ---- CSKV -------------------------------------------------------------------------------------------------------
class _CalibStub(nn.Module):
    """The smallest "model" ``calib_input_distribution`` accepts: modules named like Llama's k/v projections that
    receive the calibration activations x = embedding(input_ids) (one layer)."""

    def __init__(self, emb: torch.Tensor, C: int):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=1)
        self.emb = nn.Embedding.from_pretrained(emb)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.k_proj = nn.Linear(emb.shape[1], C, bias=False)
        layer.self_attn.v_proj = nn.Linear(emb.shape[1], C, bias=False)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        a = self.model.layers[0].self_attn
        return a.k_proj(x), a.v_proj(x)


def cskv_golden(root: Path) -> dict:
    qu = load_module(root / "cskv_src/utils/quant_utils.py", "official_cskv_quant_utils")
    tu = load_module(root / "cskv_src/utils/training_utils.py", "official_cskv_training_utils")
    calib_mod = load_module(root / "cskv_src/scripts/asvd_init_calib.py", "official_cskv_asvd_init_calib")
    g = torch.Generator().manual_seed(1234)
    out: dict = {}

    # factor inits: W = nn.Linear weight [C, d_model]; n_kv = 2, head_dim = 16 (C = 32), d_model = 48, r/head = 4
    d_model, n_kv, head_dim, per_head = 48, 2, 16, 4
    C = n_kv * head_dim
    W_k = torch.randn(C, d_model, generator=g) / d_model ** 0.5
    W_v = torch.randn(C, d_model, generator=g) / d_model ** 0.5
    a_svd, b_svd = tu.init_svd(W_k.clone(), compressed_dim_per_head=per_head, num_heads=n_kv)

    # ASVD statistic from the official calibration hook: N samples of T tokens, batch 1 (as the official loader)
    n_samples, T, vocab = 5, 24, 50
    chan = torch.exp(torch.randn(d_model, generator=g))          # channels of very different magnitude (ASVD's case)
    emb = torch.randn(vocab, d_model, generator=g) * chan + 0.3 * torch.randn(d_model, generator=g)
    ids = torch.randint(0, vocab, (n_samples, 1, T), generator=g)
    stub = _CalibStub(emb, C)
    loader = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])} for i in range(n_samples)]
    with tempfile.TemporaryDirectory() as tmp:
        calib_mod.calib_input_distribution(stub, "stub", tmp, loader, method="abs_mean", use_cache=False)
        stats = torch.load(Path(tmp) / "stub" / "calib_input_distribution_abs_mean.pt")
    calib_k, calib_v = stats[0]
    X = emb[ids.flatten()]                                       # [N·T, d_model], the activations the hook saw
    a_asvd_k, b_asvd_k = tu.init_asvd(W_k.clone(), calib_k.clone(), compressed_dim_per_head=per_head, num_heads=n_kv)
    a_asvd_v, b_asvd_v = tu.init_asvd(W_v.clone(), calib_v.clone(), compressed_dim_per_head=per_head, num_heads=n_kv)
    out["factors"] = {
        "W_k": W_k, "W_v": W_v, "n_kv": n_kv, "per_head": per_head, "n_samples": n_samples, "X": X,
        "calib_k": calib_k, "calib_v": calib_v,
        "init_svd_a": a_svd, "init_svd_b": b_svd,
        "init_asvd_k_a": a_asvd_k, "init_asvd_k_b": b_asvd_k, "init_asvd_v_a": a_asvd_v, "init_asvd_v_b": b_asvd_v,
    }

    # quantizers: latent [bsz, n_kv, T, r/n_kv]; per-channel offsets so that some groups do not contain 0
    quant = {}
    for dtype in (torch.float32, torch.float16):
        z = (torch.randn(2, 2, 64, 8, generator=g) + 3.0 * torch.randn(1, 2, 1, 8, generator=g)).to(dtype)
        gout = torch.randn(z.shape, generator=g).to(dtype)
        case = {"z": z, "grad_out": gout}
        for name, fn, arg in (("token", qu.KVQuantizer, 8), ("channel", qu.KVQuantizerChannel, 32)):
            x = z.clone().requires_grad_(True)
            y = fn.apply(x, 4, arg)
            y.backward(gout)
            case[f"{name}_out"], case[f"{name}_grad"], case[f"{name}_group"] = y.detach(), x.grad.clone(), arg
        quant[str(dtype).removeprefix("torch.")] = case
    out["quant"] = quant
    return out


# ---- MatryoshkaKV ----------------------------------------------------------------------------------------------
def mkv_golden(root: Path) -> dict:
    sys.path.insert(0, str(root))                                # eigenvalues_decomposition imports concat_kv_cache
    ed = load_module(root / "eigenvalues_decomposition.py", "official_mkv_eigenvalues_decomposition")
    g = torch.Generator().manual_seed(4321)
    out: dict = {}

    # PCA: L = 2 layers, H = 2 KV heads, d = 16; 3 cache chunks of unequal length (exercises the running average)
    L_, H, d = 2, 2, 16
    spectrum = torch.logspace(1, -1.5, d)                        # well separated eigenvalues
    mixes = [torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(2 * L_ * H)]
    means = torch.randn(2, L_, H, d, generator=g)
    chunks = []
    for T in (40, 56, 24):
        layers = []
        for l in range(L_):
            kv = []
            for j in range(2):
                heads = [(torch.randn(T, d, generator=g) * spectrum.sqrt()) @ mixes[(j * L_ + l) * H + h].T
                         + means[j, l, h] for h in range(H)]
                kv.append(torch.stack(heads)[None])              # [1, H, T, d]
            layers.append(tuple(kv))
        chunks.append(layers)
    cov_k = [[torch.tensor(0) for _ in range(H)] for _ in range(L_)]
    cov_v = [[torch.tensor(0) for _ in range(H)] for _ in range(L_)]
    mean_k = [[torch.tensor(0) for _ in range(H)] for _ in range(L_)]
    mean_v = [[torch.tensor(0) for _ in range(H)] for _ in range(L_)]
    total = 0
    for pkv in chunks:                                           # as cal_pcallama_init.py
        cov_k, cov_v, mean_k, mean_v = ed.sum_kv_states_per_head(cov_k, cov_v, mean_k, mean_v, pkv, total)
        total += pkv[0][0].shape[2]
    ev_k, ev_v, U_k, U_v = ed.kv_states_per_head_convariance_decomposition(cov_k, cov_v, mean_k, mean_v)

    model_py = root / "LLaMA-Factory/src/llamafactory/model/custom_model/modeling_pcallama_trial.py"
    fns = load_functions(model_py, ["orthogonal_", "inverse_orthogonal_", "make_unitary_transform_det_1"],
                         {"torch": torch}, class_name="PcaLlamaAttention")
    self_ = types.SimpleNamespace(dtype=torch.float32, num_key_value_heads=H)
    U_k_det = torch.stack([fns["make_unitary_transform_det_1"](self_, torch.stack(U_k[l]).clone()) for l in range(L_)])
    U_v_det = torch.stack([fns["make_unitary_transform_det_1"](self_, torch.stack(U_v[l]).clone()) for l in range(L_)])
    out["pca"] = {
        "chunk_lengths": [40, 56, 24],
        "k_chunks": [[c[l][0] for l in range(L_)] for c in chunks],
        "v_chunks": [[c[l][1] for l in range(L_)] for c in chunks],
        "mean_k": torch.stack([torch.stack(m) for m in mean_k]), "mean_v": torch.stack([torch.stack(m) for m in mean_v]),
        "eigenvalues_k": torch.stack([torch.stack(e) for e in ev_k]),
        "eigenvalues_v": torch.stack([torch.stack(e) for e in ev_v]),
        "U_k": torch.stack([torch.stack(u) for u in U_k]), "U_v": torch.stack([torch.stack(u) for u in U_v]),
        "U_k_det1": U_k_det, "U_v_det1": U_v_det,
    }

    # Cayley / inverse Cayley (the official trainable parametrisation), batched [heads, d, d]
    Xr = 0.3 * torch.randn(3, d, d, generator=g)
    Q_from_X = fns["orthogonal_"](self_, Xr.clone())
    X_init = fns["inverse_orthogonal_"](self_, U_k_det[0].clone())           # PCA init → trainable weights
    Q_roundtrip = fns["orthogonal_"](self_, X_init.clone())
    out["cayley"] = {"X": Xr, "Q": Q_from_X, "U": U_k_det[0], "X_init": X_init, "Q_roundtrip": Q_roundtrip}

    # greedy search decision rule (cal_adaptive_rate.py): per-(kv, layer, head) errors → update_num decrements of
    # `interval`, skipping entries already at `interval`. Scores here: err = base[kv, l, h] · r / d, recomputed from
    # the current ranks every round (so entries run down to the floor and the skip is exercised).
    interval = d // 4
    upd = load_functions(root / "cal_adaptive_rate.py", ["update_two_result_truncate_rate"],
                         {"torch": torch, "interval": interval})["update_two_result_truncate_rate"]
    base = 0.5 + torch.rand(2, L_, H, generator=g)
    greedy = {"base": base, "interval": interval, "head_dim": d}
    for update_num, rounds in ((1, 12), (4, 3)):
        rk = torch.full((L_, H), d, dtype=torch.long)
        rv = torch.full((L_, H), d, dtype=torch.long)
        seq = []
        for _ in range(rounds):
            err_k, err_v = base[0] * rk / d, base[1] * rv / d
            rk, rv = upd(rk, rv, err_k, err_v, update_num)
            seq.append(torch.stack([rk, rv], dim=-1).clone())                  # [L, H, 2] (K, V)
        greedy[f"ranks_update{update_num}"] = torch.stack(seq)                 # [rounds, L, H, 2]
    out["greedy"] = greedy
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cskv", type=Path, required=True, help="extracted wln20/CSKV snapshot")
    ap.add_argument("--mkv", type=Path, required=True, help="extracted The-kamisato/MatryoshkaKV-cache snapshot")
    ap.add_argument("--cskv-commit", required=True)
    ap.add_argument("--mkv-commit", required=True)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    cskv, mkv = cskv_golden(args.cskv), mkv_golden(args.mkv)
    files = {
        "cskv_factors.pt": (cskv["factors"], "wln20/CSKV", args.cskv_commit,
                            ["cskv_src/utils/training_utils.py:init_svd", "cskv_src/utils/training_utils.py:init_asvd",
                             "cskv_src/scripts/asvd_init_calib.py:calib_input_distribution (method='abs_mean')"]),
        "cskv_quant.pt": (cskv["quant"], "wln20/CSKV", args.cskv_commit,
                          ["cskv_src/utils/quant_utils.py:KVQuantizer (n_bits=4, q_group_size=8) forward+backward",
                           "cskv_src/utils/quant_utils.py:KVQuantizerChannel (n_bits=4, q_window_size=32) "
                           "forward+backward"]),
        "mkv_pca.pt": (mkv["pca"], "The-kamisato/MatryoshkaKV-cache", args.mkv_commit,
                       ["eigenvalues_decomposition.py:sum_kv_states_per_head",
                        "eigenvalues_decomposition.py:kv_states_per_head_convariance_decomposition",
                        "LLaMA-Factory/src/llamafactory/model/custom_model/modeling_pcallama_trial.py:"
                        "PcaLlamaAttention.make_unitary_transform_det_1"]),
        "mkv_cayley.pt": (mkv["cayley"], "The-kamisato/MatryoshkaKV-cache", args.mkv_commit,
                          ["LLaMA-Factory/src/llamafactory/model/custom_model/modeling_pcallama_trial.py:"
                           "PcaLlamaAttention.orthogonal_ (cayley)",
                           "LLaMA-Factory/src/llamafactory/model/custom_model/modeling_pcallama_trial.py:"
                           "PcaLlamaAttention.inverse_orthogonal_ (cayley)"]),
        "mkv_greedy.pt": (mkv["greedy"], "The-kamisato/MatryoshkaKV-cache", args.mkv_commit,
                          ["cal_adaptive_rate.py:update_two_result_truncate_rate (interval = head_dim/4)"]),
    }
    sidecar = {"generator": "tools/golden/make_golden.py", "torch": torch.__version__, "files": {}}
    for name, (obj, repo, commit, functions) in files.items():
        torch.save(obj, OUT / name)
        sidecar["files"][name] = {"repo": f"https://github.com/{repo}", "commit": commit, "functions": functions,
                                  "bytes": (OUT / name).stat().st_size}
    (OUT / "golden.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(json.dumps(sidecar, indent=2))


if __name__ == "__main__":
    main()
