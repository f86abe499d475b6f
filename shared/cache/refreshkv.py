"""RefreshKV / Recycled Attention (Xu, Goyal, Choi; arXiv 2411.05787, ACL 2025 Alg. 1; spec long_context.md §2):
a small partial cache Cp of K tokens attended at most steps, refreshed now and then from the full cache Cf.

1. Prefill with full attention → Cf (the exact prefill record).
2. a = softmax attention of the last prompt token, per layer and KV head: max over the group's query heads.
3. ã = max-pool₁d(a, kernel 7, stride 1, pad 3)  (length preserved) over the tokens before the last.
4. Cp = the last token + top-(K − 1) of ã, in ascending score order (Cp[0] = lowest), i.e. exactly SnapKV's
   selection with window 1, kernel 7, max (spec §2: "this equals RA without refresh"; test R3).
5. Partial step t: attend over Cp ∪ {t}; append t's KV to Cp; evict Cp[0] so |Cp| = K.
6. Full step: Cf gains the KVs generated since the last full step — the very tensors Cp received, not recomputed —
   attend over Cf ∪ {t}, re-score with q_t (steps 2-4 on Cf), rebuild Cp.
7. Schedule: fixed stride S (steps S−1, 2S−1, … are full; S = 1 is vanilla, ``refresh_every=None`` never refreshes
   = RefreshKV's SnapKV baseline (window 1, kernel 7, max)); or dynamic (ACL): every QC = ``refresh_every`` steps,
   per layer, stay partial while cos(mean-head q_t, mean-head q at the last full step) > s (``similarity``).

Keys stay rotated at their absolute positions (P + t, never a slot index in Cp): q̃·k̃ over any subset is exact.
Bytes: :meth:`stored_tensors` is the working cache Cp that every partial step reads; Cf (offloadable, read only at
full steps) is reported by ``offloaded_bytes``. ``reads`` counts key slots attended per step (summed over layers).
A forced forward of n tokens runs the n steps in order inside the layer (``supports_forced_forward``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from shared.cache.base import CompressedCache, CompressedLayer, PrefillRecord, attention_modules
from shared.cache.registry import KVMethod
from shared.cache.rope import project_queries, query_scaling
from shared.cache.scorer import kept_tokens
from shared.cache.sinks import gather_slots, pack_kept
from shared.lambda_attention import UNLIMITED


def pooled_group_max_scores(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                            kernel_size: int) -> torch.Tensor:
    """Steps 2-3 for one query q [B, Hq, 1, D] (rotated) over keys [B, Hkv, S, D] whose last slot is the query's own
    token: ã [B, Hkv, S − 1] over the tokens before it (SnapKV with window 1: official snapkv_utils.py:55-59 pools
    only the pre-window tokens); padding → −inf."""
    B, Hq, _, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    logits = torch.einsum("bhgd,bhsd->bhgs", q[:, :, 0].reshape(B, Hkv, Hq // Hkv, D).float(), keys.float())
    a = (logits * scaling).masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
    a = a.amax(2)[..., :S - 1]                                                   # max over the group (step 2)
    a = F.max_pool1d(a.reshape(B * Hkv, 1, S - 1), kernel_size, stride=1, padding=kernel_size // 2)
    return a.view(B, Hkv, S - 1).masked_fill(~valid[:, None, :S - 1], float("-inf"))


class RefreshLayer(CompressedLayer):
    """Cf (all tokens up to the last full step) + pending (generated since) + the partial cache Cp [B, Hkv, K]."""

    supports_forced_forward = True

    def __init__(self, keys, values, valid, last_query, budget: torch.Tensor, method: "RefreshKV", scaling: float):
        super().__init__()
        self.full_keys, self.full_values, self.full_valid = keys.clone(), values.clone(), valid.clone()
        B, H, _, D = keys.shape
        self.pend_keys = keys.new_zeros(B, H, 0, D)
        self.pend_values = values.new_zeros(B, H, 0, D)
        self.budget, self.m = budget, method
        self.dtype, self.device = keys.dtype, keys.device
        self.seen, self.step, self.reads = keys.shape[2], 0, []
        self.last_full_q = last_query.mean(1)                   # [B, 1, D] mean over heads (dynamic schedule)
        self._rebuild(last_query, scaling)

    def _rebuild(self, q, scaling) -> None:
        """Steps 2-4 on Cf: Cp = the newest token + top-(K − 1) of the pooled scores of the others (SnapKV's window
        of 1), ascending by score with the newest last; stored at their absolute positions."""
        s = pooled_group_max_scores(q, self.full_keys, self.full_valid, scaling, self.m.kernel_size)
        B, H, S = s.shape[0], s.shape[1], s.shape[2] + 1
        K = int(min(self.budget.max(), S))
        order = torch.zeros((B, H, K), dtype=torch.long, device=s.device)
        ok = torch.zeros(B, K, dtype=torch.bool, device=s.device)
        for b in range(B):
            k = int(min(self.budget[b], self.full_valid[b].sum()))
            # top-(K − 1) by a stable sort: ties (max pooling makes plateaus) go to the earlier token, whatever the
            # padding; ascending by score (step 4), the newest token last
            top = s[b].sort(dim=-1, descending=True, stable=True).indices[:, :k - 1]
            order[b, :, K - k:K - 1] = top.flip(-1)
            order[b, :, K - 1] = S - 1
            ok[b, K - k:] = True
        gi = order[..., None].expand(-1, -1, -1, self.full_keys.shape[3])
        self.keys, self.values = self.full_keys.gather(2, gi), self.full_values.gather(2, gi)
        self.cp_pos, self.cp_valid = order, ok        # cp_pos: slot in Cf (= absolute position without padding)

    def get_seq_length(self) -> int:
        return self.seen

    def update(self, key_states, value_states, *args, **kwargs):
        self._cur = (key_states, value_states)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def _is_full(self, q) -> bool:
        S = self.m.refresh_every
        if S is None or (self.step + 1) % S:
            return False
        if self.m.similarity is None:
            return True
        cos = F.cosine_similarity(q.mean(1).flatten(1).float(), self.last_full_q.flatten(1).float(), dim=-1)
        return bool((cos <= self.m.similarity).any())            # partial while cos > s (ACL query check)

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """n new tokens (a forced forward) are n decode steps in order: token i's output at layer ℓ depends only on
        the cache state at its own step, which the loop reproduces exactly."""
        k_all, v_all = self._cur
        return torch.cat([self._step(query[:, :, i:i + 1], k_all[:, :, i:i + 1], v_all[:, :, i:i + 1], scaling)
                          for i in range(query.shape[2])], 1)

    def _step(self, query, k_cur, v_cur, scaling):
        B, Hq, _, D = query.shape
        H = k_cur.shape[1]
        ones = torch.ones(B, 1, dtype=torch.bool, device=query.device)
        full = self._is_full(query)
        if full:   # step 6: Cf += pending + current (the tensors Cp received), attend over all of Cf
            self.full_keys = torch.cat([self.full_keys, self.pend_keys, k_cur], 2)
            self.full_values = torch.cat([self.full_values, self.pend_values, v_cur], 2)
            self.full_valid = torch.cat([self.full_valid, ones.expand(-1, self.pend_keys.shape[2] + 1)], 1)
            self.pend_keys, self.pend_values = self.pend_keys[:, :, :0], self.pend_values[:, :, :0]
            ks, vs, ok = self.full_keys, self.full_values, self.full_valid[:, None].expand(-1, H, -1)
        else:      # step 5: attend over Cp ∪ {t}
            ks, vs = torch.cat([self.keys, k_cur], 2), torch.cat([self.values, v_cur], 2)
            ok = torch.cat([self.cp_valid, ones], 1)[:, None].expand(-1, H, -1)
        logits = torch.einsum("bhgd,bhsd->bhgs", query[:, :, 0].reshape(B, H, Hq // H, D), ks) * scaling
        p = logits.masked_fill(~ok[:, :, None], float("-inf")).float().softmax(-1).to(query.dtype)
        out = torch.einsum("bhgs,bhsd->bhgd", p, vs).reshape(B, Hq, 1, D).transpose(1, 2)
        self.reads.append(int(ok[0, 0].sum()) * H)
        if full:
            self.last_full_q = query.mean(1)
            self._rebuild(query, scaling)
        else:
            self.pend_keys = torch.cat([self.pend_keys, k_cur], 2)
            self.pend_values = torch.cat([self.pend_values, v_cur], 2)
            self.keys, self.values = ks, vs
            new_pos = torch.full((B, H, 1), self.full_keys.shape[2] + self.pend_keys.shape[2] - 1,
                                 dtype=torch.long, device=query.device)
            self.cp_pos = torch.cat([self.cp_pos, new_pos], 2)
            self.cp_valid = torch.cat([self.cp_valid, ones], 1)
            over = self.cp_valid.sum(-1) > self.budget                      # rows above K evict Cp[0]
            if bool(over.any()):
                first = self.cp_valid.long().argmax(-1)                         # first real slot = Cp[0]
                keep = self.cp_valid.clone()
                keep[over, first[over]] = False
                index, self.cp_valid = pack_kept(keep)
                self.keys, self.values = gather_slots(self.keys, index), gather_slots(self.values, index)
                self.cp_pos = self.cp_pos.gather(2, index[:, None].expand(-1, H, -1))
        self.step += 1
        return out

    def offloaded_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full_keys, self.full_values, self.pend_keys,
                                                         self.pend_values))


@dataclass
class RefreshKV(KVMethod):
    refresh_every: int | None = 10     # S (fixed) or QC (dynamic); None = never refresh (RefreshKV's SnapKV)
    similarity: float | None = None    # s of the ACL query check (0.85 Llama, 0.95 Qwen); None = fixed stride
    kernel_size: int = 7               # max-pool width (step 3)
    budget: int | None = None          # K; None: ⌈(1 − compression_ratio)·P⌉ (ratio 0: unbounded ≡ full cache)
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})
    name: ClassVar[str] = "refreshkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, lo in (("refresh_every", 1), ("budget", 1), ("kernel_size", 1)):
            v = getattr(self, key)
            if v is None and key != "kernel_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{key} must be an int >= {lo}{' or None' if key != 'kernel_size' else ''}, "
                                 f"got {v!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (length-preserving pooling), got {self.kernel_size}")
        if self.similarity is not None and (isinstance(self.similarity, bool)
                                            or not isinstance(self.similarity, (int, float))):
            raise ValueError(f"similarity must be a number or None, got {self.similarity!r}")

    def compress(self, record: PrefillRecord) -> CompressedCache:
        if record.model is None:
            raise ValueError("refreshkv needs the record's model (it re-scores with the last prompt query)")
        valid = record.valid
        n_real = valid.sum(-1)
        if self.budget is not None:
            budget = torch.full_like(n_real, self.budget)
        elif self.compression_ratio == 0.0:
            budget = torch.full_like(n_real, UNLIMITED)
        else:
            budget = torch.tensor([kept_tokens(int(n), self.compression_ratio) for n in n_real], device=n_real.device)
        layers = []
        for module, rec in zip(attention_modules(record.model), record.layers):
            q = project_queries(module, rec.hidden[:, -1:], rec.cos[:, -1:], rec.sin[:, -1:])   # the last prompt query
            layers.append(RefreshLayer(rec.keys, rec.values, valid, q, budget, self,
                                       query_scaling(module, rec.keys.shape[-1])))
        return CompressedCache(layers, method=self.name, kv_mask=record.attention_mask)
