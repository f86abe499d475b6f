"""Low-rank latent KV cache with CSKV's bi-branch window (CSKV §3.2), also used by the SVD/ASVD baselines.

Per layer the cache keeps, for every token older than the window, only the latents ``z_K = x·A_K`` and
``z_V = x·A_V`` (r channels instead of n_kv·head_dim), optionally as packed int4 (keys per-channel over 32-token
groups, values per-token — the paper's/KIVI's quantizer, from ``kernels.quant``). Keys are rebuilt as
``RoPE(z_K·B_K)`` — RoPE applied *after* reconstruction — and values as ``z_V·B_V``.

Blocked window (official code, KIVI-style): at decode step t (the token at position t attends), key j is kept
exact iff ``j ≥ W·⌊t/W⌋``; ``W = 0`` keeps nothing exact — not even the attending token's own key/value (ours,
the default), or, with ``current_exact=True`` (the official CSKV code), the attending token's own K/V are exact at
its own step and stored only as latents afterwards (bytes stay latents-only). For ``W > 0`` the attending token is
always inside its window, so both settings are identical. Prefill attention is exact (new tokens of a multi-token
``update`` are returned exact); the window rule is applied after it. Batches with left padding work (padding is
masked by the model); window blocks are aligned on batch positions, so a padded row's window boundary can sit up to
W − 1 tokens away from where its solo run would put it (identical when the pad count is a multiple of W).

Reconstruction of a completed block never changes, so it is materialized once when the block leaves the window
(``materialize=True``, default; scratch, excluded from byte accounting); ``materialize=False`` rebuilds every
latent at every step, as a deployment without scratch would — a test asserts both give identical logits.

Teacher forcing in one forward (``forced_decode``, see ``shared.kv_eval.forced_forward``): the version in which a
query at step t reads key j depends on t — exact if ``j ≥ b(t)`` (b = the window boundary above), int4 latent if
quantized (``j < 32·⌊b(t)/32⌋``), else fp latent — so one multi-token update returns the keys/values as
``[stable latents ; fp-latent copy of the tail ; int4-latent copy of the tail ; exact copy of the tail]`` (the tail
= slots whose version can still change: from the first not-yet-quantized latent, or the first window token without
quantization) and :meth:`LowRankLayer.attend` attends with a per-query mask that, for every key, enables exactly
the copy that query's own step would read (causal and padding taken from the model's mask). Every copy is built as
the steps build it (same latents, same reconstruction, the int4 groups quantized by the storage code itself), so
the logits equal token-by-token decoding up to float reassociation. Afterwards the layer stores the n tokens as
the n steps would (same window, latents, int4 groups, bytes). ``impl="triton"`` layers take the same torch path in
forced mode (the fused kernel serves one-token steps only).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass, field
from typing import ClassVar

from kernels.quant import dequantize_int4, quantize_int4
from shared.cache.base import CompressedCache, CompressedLayer, PrefillRecord, model_attention
from shared.cache.decompose import Factors, factorize, projection_weights, rank_for_density
from shared.cache.registry import KVMethod
from shared.cache.rope import apply_rope
from shared.memory import tensor_bytes

QUANT_GROUP = 32  # tokens per key-quantization group (per channel), as in the paper's quantizer


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b.clone() if a is None else torch.cat([a, b], dim=dim)


class LowRankLayer(CompressedLayer):
    supports_forced_forward = True  # module doc, "Teacher forcing in one forward" (also impl="triton")

    def __init__(self, fk: Factors, fv: Factors, num_kv_heads: int, window: int = 32, quantize: bool = False,
                 materialize: bool = True, impl: str = "torch", current_exact: bool = False,
                 quant_scheme: str = "reprise", value_groups: str = "row"):
        super().__init__()
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        if impl not in ("torch", "triton"):
            raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
        if impl == "triton" and (fk.groups != num_kv_heads or fv.groups != num_kv_heads):
            raise ValueError(f"impl='triton' needs the per-head decomposition (groups = {num_kv_heads} KV heads); "
                             f"got groups {fk.groups}/{fv.groups} — the joint one is compute-bound, use impl='torch'")
        self.impl = impl
        self.fused_step_ready = False
        if quantize and (fk.A.shape[-1] % 2 or fv.A.shape[-1] % 2):
            raise ValueError(f"int4 packing needs an even rank per group, got {fk.A.shape[-1]} / {fv.A.shape[-1]}")
        self.fk, self.fv, self.num_kv_heads = fk, fv, num_kv_heads
        self.window, self.quantize, self.materialize = window, quantize, materialize
        # int4 semantics (kernels.quant): scheme "reprise" (float zero) | "official" (integer zero point in [0, 15]);
        # values per token in groups of the whole latent row of a decomposition group ("row") or per KV head
        # ("head", the official code: r / n_kv channels). Keys: per channel over QUANT_GROUP tokens either way.
        heads_per_group = num_kv_heads // fv.groups
        if value_groups not in ("row", "head") or (value_groups == "head" and fv.A.shape[-1] % heads_per_group):
            raise ValueError(f"value_groups must be 'row' or 'head' (with a value rank divisible by the KV heads per "
                             f"group, {heads_per_group}), got {value_groups!r} for rank {fv.A.shape[-1]}")
        self.quant_scheme = quant_scheme
        self.value_group = fv.A.shape[-1] // (heads_per_group if value_groups == "head" else 1)
        if quantize and self.value_group % 2:
            raise ValueError(f"int4 packing needs an even value group, got {self.value_group} channels "
                             f"(value_groups={value_groups!r})")
        if impl == "triton" and quantize and (quant_scheme != "reprise" or self.value_group != fv.A.shape[-1]):
            raise ValueError("impl='triton' (fused int4 decode) supports quant_scheme='reprise' with value_groups="
                             f"'row' only, got {quant_scheme!r} / {value_groups!r}")
        self.current_exact = bool(current_exact)
        self._forced = None                      # scratch: (returned keys, layout) of a forced multi-token update
        self.n_seen = 0
        self.q_chunks: list[tuple] = []          # stored: int4 latents of completed 32-token groups
        self.zk = self.zv = None                 # stored: fp latents of the latent region not yet quantized
        self.wk = self.wv = None                 # stored: exact K (post-RoPE) / V of the window
        self.wzk = self.wzv = None               # stored: latents of window tokens (needed when they leave)
        self._lat_cos = self._lat_sin = None     # scratch: RoPE of latent-region tokens (derivable from positions)
        self._win_cos = self._win_sin = None
        self._rec_q = None                       # scratch: materialized K/V of the quantized chunks
        self._rec_fp = None                      # scratch: materialized K/V of the fp latent region
        self._x = self._cos = self._sin = None

    # ---- hooks -------------------------------------------------------------------------------------------
    def observe(self, hidden, cos, sin):
        self._x, self._cos, self._sin = hidden, cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)

    # ---- storage -----------------------------------------------------------------------------------------
    def stored_tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.zk, self.zv, self.wk, self.wv, self.wzk, self.wzv) if t is not None]
        for qk, qv in self.q_chunks:
            out += [qk.packed, qk.scale, qk.zero, qv.packed, qv.scale, qv.zero]
        return out

    @property
    def n_latent(self) -> int:
        n_fp = 0 if self.zk is None else self.zk.shape[2]
        return n_fp + QUANT_GROUP * len(self.q_chunks)

    def get_seq_length(self) -> int:
        return self.n_seen

    # ---- reconstruction ----------------------------------------------------------------------------------
    def _rebuild(self, zk, zv, cos, sin):
        """K = RoPE(z_K·B_K) (RoPE after reconstruction), V = z_V·B_V."""
        k = apply_rope(self.fk.reconstruct(zk, self.num_kv_heads), cos, sin)
        return k, self.fv.reconstruct(zv, self.num_kv_heads)

    def _latent_kv(self):
        parts = []
        if self.q_chunks:
            if self._rec_q is None or not self.materialize:
                zk = torch.cat([dequantize_int4(qk) for qk, _ in self.q_chunks], dim=2)
                zv = torch.cat([dequantize_int4(qv) for _, qv in self.q_chunks], dim=2)
                n = zk.shape[2]
                self._rec_q = self._rebuild(zk, zv, self._lat_cos[:, :n], self._lat_sin[:, :n])
            parts.append(self._rec_q)
        if self.zk is not None and self.zk.shape[2]:
            if self._rec_fp is None or not self.materialize:
                n0 = QUANT_GROUP * len(self.q_chunks)
                self._rec_fp = self._rebuild(self.zk, self.zv, self._lat_cos[:, n0:], self._lat_sin[:, n0:])
            parts.append(self._rec_fp)
        return parts

    def attn_boundary(self, t):
        """Slots below this are read as latents by the token in slot ``t`` (int or tensor) at its own step."""
        if self.window == 0:
            return t if self.current_exact else t + 1
        return self.window * (t // self.window)

    def _rebalance(self, boundary: int | None = None) -> None:
        """Move window tokens below ``boundary`` (default: the stored boundary after the last token's step — every
        token latent for W = 0) into the latent region, quantizing completed 32-token groups."""
        if boundary is None:
            boundary = self.n_seen if self.window == 0 else self.attn_boundary(self.n_seen - 1)
        move = boundary - self.n_latent
        if move <= 0:
            return
        self.zk, self.zv = _cat(self.zk, self.wzk[:, :, :move], 2), _cat(self.zv, self.wzv[:, :, :move], 2)
        self._lat_cos = _cat(self._lat_cos, self._win_cos[:, :move], 1)
        self._lat_sin = _cat(self._lat_sin, self._win_sin[:, :move], 1)
        self.wk, self.wv = self.wk[:, :, move:].clone(), self.wv[:, :, move:].clone()
        self.wzk, self.wzv = self.wzk[:, :, move:].clone(), self.wzv[:, :, move:].clone()
        self._win_cos, self._win_sin = self._win_cos[:, move:].clone(), self._win_sin[:, move:].clone()
        self._rec_fp = None
        if self.quantize:
            while self.zk.shape[2] >= QUANT_GROUP:
                gk, gv = self.zk[:, :, :QUANT_GROUP], self.zv[:, :, :QUANT_GROUP]
                self.q_chunks.append((quantize_int4(gk.contiguous(), QUANT_GROUP, axis=-2, scheme=self.quant_scheme),
                                      quantize_int4(gv.contiguous(), self.value_group, axis=-1,
                                                    scheme=self.quant_scheme)))
                self.zk, self.zv = self.zk[:, :, QUANT_GROUP:].clone(), self.zv[:, :, QUANT_GROUP:].clone()
                self._rec_q = None

    # ---- Cache API ---------------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if self._x is None:
            raise RuntimeError("LowRankLayer needs the attention input: run the model inside shared.cache.attach()")
        x, cos, sin = self._x, self._cos, self._sin
        self._x = None
        n_new = key_states.shape[-2]
        if x.shape[1] != n_new:
            raise RuntimeError(f"observed {x.shape[1]} tokens but update got {n_new}")
        self.dtype, self.device = key_states.dtype, key_states.device
        zk, zv = self.fk.latent(x), self.fv.latent(x)
        if self.forced_decode:
            return self._forced_update(key_states, value_states, zk, zv, cos, sin)
        if n_new > 1:  # prefill chunk: its own attention is exact; older tokens are read as stored
            old = self._latent_kv() + ([(self.wk, self.wv)] if self.wk is not None else [])
            out_k = torch.cat([p[0] for p in old] + [key_states], dim=2)
            out_v = torch.cat([p[1] for p in old] + [value_states], dim=2)
        self.wk, self.wv = _cat(self.wk, key_states, 2), _cat(self.wv, value_states, 2)
        self.wzk, self.wzv = _cat(self.wzk, zk, 2), _cat(self.wzv, zv, 2)
        self._win_cos, self._win_sin = _cat(self._win_cos, cos, 1), _cat(self._win_sin, sin, 1)
        self.n_seen += n_new
        if n_new > 1:
            self._rebalance()
            return out_k, out_v
        self._rebalance(self.attn_boundary(self.n_seen - 1))
        if self.impl == "triton":  # the fused attention reads the latents itself (see attend)
            self.fused_step_ready = True
            return self.wk, self.wv
        parts = self._latent_kv() + [(self.wk, self.wv)]
        out = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        self._rebalance()  # W = 0 with current_exact: the token read exact just now is stored as a latent
        return out

    def _forced_update(self, key_states, value_states, zk, zv, cos, sin):
        """n teacher-forced decode steps in one update (module doc): returns [stable ; fp tail ; int4 tail ; exact
        tail] K/V and stores the tokens as the n steps would; :meth:`attend` builds the per-query mask."""
        S, n = self.n_seen, key_states.shape[-2]
        n_lat, nq0 = self.n_latent, len(self.q_chunks)
        r0 = QUANT_GROUP * nq0 if self.quantize else n_lat         # the tail [r0, S + n) can change version
        stable = self._latent_kv()
        if self.quantize:
            stable = stable[:1] if nq0 else []
        tail_zk = [t for t in ((self.zk if self.quantize else None), self.wzk) if t is not None] + [zk]
        tail_zv = [t for t in ((self.zv if self.quantize else None), self.wzv) if t is not None] + [zv]
        lat_c = [self._lat_cos[:, r0:]] if self.quantize and self._lat_cos is not None else []
        lat_s = [self._lat_sin[:, r0:]] if self.quantize and self._lat_sin is not None else []
        tail_cos = torch.cat(lat_c + [t for t in (self._win_cos,) if t is not None] + [cos], 1)
        tail_sin = torch.cat(lat_s + [t for t in (self._win_sin,) if t is not None] + [sin], 1)
        fp_tail = self._rebuild(torch.cat(tail_zk, 2), torch.cat(tail_zv, 2), tail_cos, tail_sin)
        # store exactly as the steps would (window append, then the boundary after the last step)
        self.wk, self.wv = _cat(self.wk, key_states, 2), _cat(self.wv, value_states, 2)
        exact = (self.wk, self.wv)                                  # slots [n_lat, S + n)
        self.wzk, self.wzv = _cat(self.wzk, zk, 2), _cat(self.wzv, zv, 2)
        self._win_cos, self._win_sin = _cat(self._win_cos, cos, 1), _cat(self._win_sin, sin, 1)
        self.n_seen += n
        self._rebalance()
        q_tail, n_q = [], 0
        if self.quantize and len(self.q_chunks) > nq0:              # groups quantized during these steps
            new = self.q_chunks[nq0:]
            zq_k = torch.cat([dequantize_int4(c[0]) for c in new], 2)
            zq_v = torch.cat([dequantize_int4(c[1]) for c in new], 2)
            n_q = zq_k.shape[2]
            q_tail = [self._rebuild(zq_k, zq_v, tail_cos[:, :n_q], tail_sin[:, :n_q])]
        parts = stable + [fp_tail] + q_tail + [exact]
        k_all = torch.cat([p[0] for p in parts], dim=2)
        v_all = torch.cat([p[1] for p in parts], dim=2)
        self._forced = (k_all, (S, n, r0, n_lat, n_q))
        return k_all, v_all

    def forced_mask(self, attention_mask, batch: int, device) -> torch.Tensor:
        """[B, 1, n, K] bool over the keys of the last forced update: the model's causal/padding mask over slots,
        restricted per query (slot t) to the copy of each key its step reads — exact iff j ≥ b(t), int4 latent iff
        j < 32·⌊b(t)/32⌋ (quantize), else fp latent."""
        S, n, r0, n_lat, n_q = self._forced[1]
        L = S + n
        if attention_mask is None:
            base = torch.ones(n, L, dtype=torch.bool, device=device).tril(S)[None, None]
        else:
            base = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            if base.shape[-2:] != (n, L):
                raise RuntimeError(f"forced mask: expected the model's mask over [{n}, {L}], got {tuple(base.shape)}")
        base = base.expand(batch, 1, n, L)
        t = torch.arange(S, L, device=device)
        b = self.attn_boundary(t)
        bq = QUANT_GROUP * (b // QUANT_GROUP) if self.quantize else torch.zeros_like(b)
        tail, qs, ex = (torch.arange(a, z, device=device) for a, z in ((r0, L), (r0, r0 + n_q), (n_lat, L)))
        sel = torch.cat([torch.ones(n, r0, dtype=torch.bool, device=device),
                         (tail[None] < b[:, None]) & (tail[None] >= bq[:, None]),   # fp latent
                         qs[None] < bq[:, None],                                        # int4 latent
                         ex[None] >= b[:, None]], dim=1)                                # exact
        cols = torch.cat([torch.arange(r0, device=device), tail, qs, ex])
        return base[..., cols] & sel

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """impl="triton": a one-token decode step attends over the stored latents + window with the fused kernel,
        ``o = softmax(q·RoPE(z_K B_K)ᵀ ⊕ q·K_winᵀ) (z_V B_V ⊕ V_win)`` — no rebuilt K/V; everything else: None
        (the router runs the model's attention on what :meth:`update` returned). After a forced multi-token
        update: the model's attention over the version copies with :meth:`forced_mask` (module doc)."""
        if self._forced is not None and key is self._forced[0]:
            mask = self.forced_mask(attention_mask, query.shape[0], query.device)
            self._forced = None
            return model_attention(module, query, key, value, mask, scaling, **kwargs)
        if not (self.fused_step_ready and query.shape[2] == 1):
            return None
        self.fused_step_ready = False
        out = self.fused_attention(query[:, :, 0], scaling)                   # [B, Hq, D]
        self._rebalance()  # W = 0 with current_exact: store the token the kernel just read exact
        return out[:, None].to(query.dtype)                                   # HF layout [B, q_len, Hq, D]

    def fused_attention(self, q: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """One decode step over the stored latents + window with ``kernels.latent_attention`` (q: [B, Hq, D])."""
        from kernels.latent_attention import latent_decode_attention
        from kernels.quant import cat_int4_tokens

        B, Hkv, D = q.shape[0], self.num_kv_heads, q.shape[-1]
        if self.q_chunks and (self.zk is None or self.zk.shape[2] == 0):
            lk = cat_int4_tokens([c[0] for c in self.q_chunks])
            lv = cat_int4_tokens([c[1] for c in self.q_chunks])
        else:  # fp latents (or a mixed quantized + fp tail: dequantize the chunks)
            zk = [dequantize_int4(c[0]) for c in self.q_chunks] + ([self.zk] if self.zk is not None else [])
            zv = [dequantize_int4(c[1]) for c in self.q_chunks] + ([self.zv] if self.zv is not None else [])
            empty = q.new_zeros(B, Hkv, 0, self.fk.A.shape[-1]), q.new_zeros(B, Hkv, 0, self.fv.A.shape[-1])
            lk = torch.cat(zk, 2) if zk else empty[0]
            lv = torch.cat(zv, 2) if zv else empty[1]
        n = self.n_latent
        cos = self._lat_cos if self._lat_cos is not None else q.new_zeros(B, 0, D)
        sin = self._lat_sin if self._lat_sin is not None else q.new_zeros(B, 0, D)
        return latent_decode_attention(q, lk, lv, self.fk.B.to(q.dtype), self.fv.B.to(q.dtype), cos[:, :n],
                                       sin[:, :n], self.wk, self.wv, scale=scaling, impl="triton")

    def load_prefill(self, hidden, keys, values, cos, sin) -> None:
        """Compress an exactly-prefilled context (from a :class:`PrefillRecord`) as if it had been decoded."""
        self.observe(hidden, cos, sin)
        self.update(keys, values)

    def analytic_bytes(self) -> int:
        """Bytes the layer should hold by formula (checked against :meth:`stored_bytes` in tests)."""
        B = self.wk.shape[0] if self.wk is not None else 0
        el = torch.finfo(self.dtype).bits // 8
        rk, rv, g = self.fk.rank, self.fv.rank, self.fk.groups
        n_fp = 0 if self.zk is None else self.zk.shape[2]
        n_q = QUANT_GROUP * len(self.q_chunks)
        n_w = 0 if self.wk is None else self.wk.shape[2]
        C = self.wk.shape[1] * self.wk.shape[3] if self.wk is not None else 0
        fp = (n_fp + n_w) * (rk + rv) * el + n_w * 2 * C * el
        q = n_q * (rk + rv) // 2 + 2 * el * (rk * (n_q // QUANT_GROUP) + n_q * rv // self.value_group)
        return B * (fp + q)


def lowrank_cache(record: PrefillRecord, factors: list[tuple[Factors, Factors]], num_kv_heads: int,
                  window: int = 32, quantize: bool = False, method: str = "cskv", materialize: bool = True,
                  impl: str = "torch", current_exact: bool = False, quant_scheme: str = "reprise",
                  value_groups: str = "row") -> CompressedCache:
    """Build a :class:`LowRankLayer` cache from an exact prefill; ``factors[l] = (K factors, V factors)``;
    ``current_exact`` (matters for ``window=0`` only): the official code's exact current token (module doc);
    ``quant_scheme`` / ``value_groups``: the int4 semantics (:class:`LowRankLayer`)."""
    if len(factors) != len(record.layers):
        raise ValueError(f"got factors for {len(factors)} layers, the model has {len(record.layers)}")
    layers = []
    for (fk, fv), rec in zip(factors, record.layers):
        layer = LowRankLayer(fk, fv, num_kv_heads, window=window, quantize=quantize, materialize=materialize,
                             impl=impl, current_exact=current_exact, quant_scheme=quant_scheme,
                             value_groups=value_groups)
        layer.load_prefill(rec.hidden, rec.keys, rec.values, rec.cos, rec.sin)
        layers.append(layer)
    if impl == "triton" and record.attention_mask is not None:
        raise ValueError("impl='triton' (fused decode) does not read an attention mask: left-padded batches need "
                         "impl='torch'")
    return CompressedCache(layers, method=method, kv_mask=record.attention_mask)


def svd_factors(model, density: float, per_head: bool = False) -> list[tuple[Factors, Factors]]:
    """Plain SVD factors of every layer's W_K and W_V at ``density`` (the data-free low-rank baseline)."""
    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    r = rank_for_density(density, head_dim, n_kv)
    g = n_kv if per_head else 1
    return [(factorize(wk, r, g, "svd"), factorize(wv, r, g, "svd"))
            for wk, wv in zip(projection_weights(model, "k"), projection_weights(model, "v"))]


@dataclass
class LowRank(KVMethod):
    """CSKV's bi-branch low-rank cache (and the SVD/ASVD/whitened baselines, which differ only in ``factors``).

    ``compression_ratio`` = 1 − density of the latents (the paper's accounting; the exact window is extra and shows
    in the measured bytes). ``factors[l] = (K factors, V factors)``; None → plain SVD of the record's model weights
    at density ``1 − compression_ratio`` (``per_head`` picks the decomposition). Given factors must have that density
    (mean of K and V, within one channel per head).

    ``current_exact`` (default False = ours): with ``window=0`` the attending token's own K/V are exact at its own
    step, as in the official CSKV code (run the paper's W = 0 rows with True); for ``window > 0`` both values give
    identical caches and logits (the attending token is always in its window).

    ``quant_scheme`` (with ``quantize``): ``"reprise"`` (ours, default: float zero point = group min) or
    ``"official"`` (the official CSKV quantizer: integer zero point clamped to [0, 15]); ``value_groups``: ``"row"``
    (ours: one value group per latent row) or ``"head"`` (the official code: one per KV head)."""

    factors: list | None = None
    window: int = 32
    quantize: bool = False
    impl: str = "torch"
    per_head: bool = False
    current_exact: bool = False
    quant_scheme: str = "reprise"
    value_groups: str = "row"
    _svd: dict = field(default_factory=dict, init=False, repr=False)
    needs: ClassVar[frozenset[str]] = frozenset({"factors", "fused"})
    name: ClassVar[str] = "lowrank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")
        if self.impl not in ("torch", "triton"):
            raise ValueError(f"impl must be 'torch' or 'triton', got {self.impl!r}")
        if not isinstance(self.current_exact, bool):
            raise ValueError(f"current_exact must be a bool, got {self.current_exact!r}")
        from kernels.quant import SCHEMES

        if self.quant_scheme not in SCHEMES:
            raise ValueError(f"quant_scheme must be one of {SCHEMES}, got {self.quant_scheme!r}")
        if self.value_groups not in ("row", "head"):
            raise ValueError(f"value_groups must be 'row' or 'head', got {self.value_groups!r}")

    def _factors(self, model) -> list:
        if self.factors is not None:
            return self.factors
        if id(model) not in self._svd:
            self._svd[id(model)] = svd_factors(model, 1.0 - self.compression_ratio, self.per_head)
        return self._svd[id(model)]

    def full_sequence(self, model):
        """Always-compressed form (window 0 only): every k_proj/v_proj weight is its rank-r approximation (A·B)ᵀ."""
        from shared.cache.decompose import dense_factors

        if self.window != 0 or self.quantize or self.current_exact:
            raise ValueError(f"lowrank has a full-sequence form only without exact window, exact current token and "
                             f"quantization; got window={self.window}, current_exact={self.current_exact}, "
                             f"quantize={self.quantize}")
        return dense_factors(model, self._factors(model))

    def compress(self, record: PrefillRecord) -> CompressedCache:
        density = 1.0 - self.compression_ratio
        factors = self._factors(record.model)
        n_kv, head_dim = record.layers[0].keys.shape[1], record.layers[0].keys.shape[-1]
        fk, fv = factors[0]
        got = (fk.rank + fv.rank) / (2 * n_kv * head_dim)
        if abs(got - density) > 1.0 / head_dim + 1e-9:
            raise ValueError(f"factors keep {got:.4f} of the K/V channels but compression_ratio="
                             f"{self.compression_ratio} asks for density {density:.4f}")
        return lowrank_cache(record, factors, n_kv, window=self.window, quantize=self.quantize, method=self.name,
                             impl=self.impl, current_exact=self.current_exact, quant_scheme=self.quant_scheme,
                             value_groups=self.value_groups)
