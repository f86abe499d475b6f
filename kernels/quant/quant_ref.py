"""4-bit asymmetric min-max quantization (the CSKV / KIVI quantizer) — plain-PyTorch reference, the spec.

CSKV (arXiv 2409.10593, §3.3 "QAT"; spec: papers/cskv.md) quantizes the cached latents to 4 bits with an
asymmetric min-max quantizer, *keys per channel over groups of 32 tokens* and *values per token* (KIVI's grouping).
For one group ``g`` of values::

    scale_g = (max_g - min_g) / 15          (Eq. Q1; a zero range is guarded: the code is 0 and x̂ = min_g)
    zero_g  = min_g                          (Eq. Q2)
    code    = clamp(round((x - zero_g) / scale_g), 0, 15)        (Eq. Q3)
    x̂       = code * scale_g + zero_g                            (Eq. Q4)

``round`` is round-half-up (``floor(v + 0.5)``) so that the Triton kernel reproduces the codes bit for bit
(``torch.round``'s half-to-even has no libdevice-free Triton equivalent); for ``v >= 0`` the two differ only at
exact ties. ``scale``/``zero`` are rounded to ``x.dtype`` *before* the codes are computed, so the stored
(scale, zero) are exactly the ones that reproduce ``x̂``, and ``|x - x̂| <= scale / 2`` (up to ``x.dtype`` rounding).

Storage layout of :class:`Int4Tensor` (for a tensor of logical shape ``[..., T, C]``):

* ``packed``: ``uint8 [..., T, C // 2]``; byte ``i`` holds channel ``2i`` in its low nibble and channel ``2i + 1`` in
  its high nibble (packing is always along the last dim, which must be even).
* ``axis == -2`` (keys: per channel over ``group_size`` consecutive tokens): ``scale``/``zero`` are
  ``[..., T // group_size, C]``.
* ``axis == -1`` (values: per token over ``group_size`` consecutive channels; ``group_size == C`` is the whole row):
  ``scale``/``zero`` are ``[..., T, C // group_size]``.

Two schemes (``scheme=``), ours the default:

* ``"reprise"`` — Eqs. Q1–Q4 above: float zero ``zero_g = min_g``, so ``[min_g, max_g]`` is always representable.
* ``"official"`` — the released CSKV code (github.com/wln20/CSKV, ``cskv_src/utils/quant_utils.py``,
  ``KVQuantizer`` / ``KVQuantizerChannel`` with ``zero_point=True``, ``n_bits=4``), op for op in ``x.dtype``::

      scale_g = clamp(max_g − min_g, 1e-5) / 15                               (Eq. O1)
      zp_g    = clamp(−round(min_g / scale_g), 0, 15)      (integer zero point; round = half-to-even)   (Eq. O2)
      code    = clamp(round(x / scale_g) + zp_g, 0, 15)                       (Eq. O3)
      x̂       = (code − zp_g) · scale_g                                       (Eq. O4)

  The representable range is ``[−zp_g·scale_g, (15 − zp_g)·scale_g]``; it contains 0, so a group whose values
  all have one sign and |mean| > range is clipped (e.g. min_g > 0 ⇒ zp_g = 0 ⇒ range [0, max_g − min_g]).
  :class:`Int4Tensor` stores it as ``zero_g = −zp_g·scale_g`` (rounded to ``x.dtype``), so Eq. Q4 gives Eq. O4 up to
  the rounding of that product and of the sum (≤ ~1 ulp of ``15·scale_g`` in ``x.dtype``); the codes are
  identical. :func:`fake_quant_int4` with ``scheme="official"`` follows Eqs. O1–O4 literally (bit-exact).

The official code groups values per token *per head* (``q_group_size = r / n_kv``): pass
``group_size = head_group_size(r, n_kv)`` with ``axis=-1`` on a joint ``[..., T, r]`` latent (head ``i`` owns
channels ``i·r/n_kv … (i+1)·r/n_kv − 1``, exactly the official ``view(bsz, T, n_kv, r/n_kv)``). Keys with the
official ``use_window`` (``KVQuantizerChannel``): ``axis=-2``, ``group_size = q_window_size`` (32).

Straight-through estimators (``ste=`` of :func:`fake_quant_int4`):

* ``"identity"`` — ``∂x̂/∂x := I`` (ours, default).
* ``"clipped"`` — the official backward: the gradient is zeroed where ``x ≥ hi_g`` or ``x ≤ lo_g`` (inclusive,
  as the official ``ge``/``le``), ``lo_g = scale_g·(0 − zp_g)``, ``hi_g = scale_g·(15 − zp_g)`` (official scheme) or
  ``lo_g = zero_g``, ``hi_g = zero_g + 15·scale_g`` (reprise scheme); 1 elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: dtypes the quantizer accepts (and stores ``scale``/``zero`` in).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest 4-bit code.
QMAX = 15
#: Quantizer schemes: ours (float zero = min) and the official CSKV code's (integer zero point in [0, 15]).
SCHEMES = ("reprise", "official")
#: Straight-through estimators of :func:`fake_quant_int4`.
STES = ("identity", "clipped")
#: The official code's floor on the group range (``(max - min).clamp(min=1e-5)``).
OFFICIAL_MIN_RANGE = 1e-5


@dataclass(frozen=True)
class Int4Tensor:
    """A 4-bit asymmetric-quantized tensor: packed codes + one ``(scale, zero)`` per group (layout: module doc)."""

    packed: Tensor
    scale: Tensor
    zero: Tensor
    shape: torch.Size
    group_size: int
    axis: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tensor dequantizes to (the dtype of ``scale``/``zero``)."""
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def nbytes(self) -> int:
        """Real storage bytes of the packed codes plus scales and zeros (``numel * element_size`` of each tensor)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def analytic_nbytes(self) -> int:
        """The same count from the formula: ``numel / 2`` code bytes + 2 stats per group × element size."""
        numel = 1
        for s in self.shape:
            numel *= int(s)
        groups = numel // self.group_size
        return numel // 2 + 2 * groups * self.scale.element_size()

    def dequantize(self) -> Tensor:
        """Shorthand for :func:`dequantize_int4` (reference implementation)."""
        return dequantize_int4(self)


def normalize_axis(axis: int, ndim: int) -> int:
    """Map ``axis`` to -1 or -2; raise ``ValueError`` for any other axis."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"axis must be an int in {{-2, -1}} (or ndim-2, ndim-1), got {axis!r}")
    if axis in (ndim - 1, ndim - 2) and axis >= 0:
        axis = axis - ndim
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -2 (groups of tokens, per channel) or -1 (groups of channels, per token) "
                         f"for a {ndim}-d tensor, got {axis}")
    return axis


def check_quantize_inputs(x: Tensor, group_size: int, axis: int) -> int:
    """Validate ``quantize_int4`` arguments (shared by both implementations); returns the normalized axis."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x.dtype must be one of float16/bfloat16/float32, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims ([..., tokens, channels]), got shape {tuple(x.shape)}")
    axis = normalize_axis(axis, x.ndim)
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"the last dim is packed two codes per byte and must be even, got {x.shape[-1]}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = x.shape[axis]
    if n % group_size != 0:
        raise ValueError(f"group_size must divide x.shape[{axis}] = {n}, got {group_size}")
    if axis == -1 and group_size % 2 != 0:
        raise ValueError(f"with axis=-1 (groups along the packed dim) group_size must be even, got {group_size}")
    return axis


def check_int4_tensor(q: Int4Tensor) -> None:
    """Validate that ``q`` is a well-formed :class:`Int4Tensor`."""
    if not isinstance(q, Int4Tensor):
        raise ValueError(f"expected an Int4Tensor, got {type(q).__name__}")
    shape = tuple(q.shape)
    if len(shape) < 2 or shape[-1] % 2 != 0:
        raise ValueError(f"Int4Tensor.shape must have >= 2 dims and an even last dim, got {shape}")
    if q.packed.dtype != torch.uint8:
        raise ValueError(f"Int4Tensor.packed must be uint8, got {q.packed.dtype}")
    if tuple(q.packed.shape) != shape[:-1] + (shape[-1] // 2,):
        want = shape[:-1] + (shape[-1] // 2,)
        raise ValueError(f"Int4Tensor.packed shape must be {want}, got {tuple(q.packed.shape)}")
    if q.axis not in (-1, -2):
        raise ValueError(f"Int4Tensor.axis must be -2 or -1, got {q.axis}")
    if q.group_size < 1 or shape[q.axis] % q.group_size != 0:
        raise ValueError(f"Int4Tensor.group_size must divide shape[{q.axis}] = {shape[q.axis]}, got {q.group_size}")
    want = _stats_shape(shape, q.group_size, q.axis)
    for name, t in (("scale", q.scale), ("zero", q.zero)):
        if tuple(t.shape) != want:
            raise ValueError(f"Int4Tensor.{name} shape must be {want}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"Int4Tensor.{name}.dtype must be float16/bfloat16/float32, got {t.dtype}")
    if q.zero.dtype != q.scale.dtype:
        raise ValueError(f"Int4Tensor.zero.dtype ({q.zero.dtype}) must equal scale.dtype ({q.scale.dtype})")


def _stats_shape(shape: tuple[int, ...], group_size: int, axis: int) -> tuple[int, ...]:
    if axis == -2:
        return tuple(shape[:-2]) + (shape[-2] // group_size, shape[-1])
    return tuple(shape[:-1]) + (shape[-1] // group_size,)


def _grouped_minmax(x32: Tensor, group_size: int, axis: int) -> tuple[Tensor, Tensor]:
    """Per-group min and max of ``x32`` with the layout of ``scale`` (module doc)."""
    *lead, t, c = x32.shape
    if axis == -2:
        g = x32.reshape(*lead, t // group_size, group_size, c)
        return g.amin(dim=-2), g.amax(dim=-2)
    g = x32.reshape(*lead, t, c // group_size, group_size)
    return g.amin(dim=-1), g.amax(dim=-1)


def _expand_stats(stat: Tensor, shape: torch.Size | tuple[int, ...], group_size: int, axis: int) -> Tensor:
    """Broadcast a per-group statistic back to the full logical shape."""
    out = stat.repeat_interleave(group_size, dim=axis)
    assert tuple(out.shape) == tuple(shape)
    return out


def _codes(x: Tensor, scale: Tensor, zero: Tensor, group_size: int, axis: int) -> Tensor:
    """Eq. Q3 with the stored (dtype-rounded) scale/zero; returns uint8 codes in [0, 15] of the logical shape."""
    s = _expand_stats(scale.float(), x.shape, group_size, axis)
    z = _expand_stats(zero.float(), x.shape, group_size, axis)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    code = torch.floor((x.float() - z) / safe + 0.5).clamp_(0, QMAX)
    return code.to(torch.uint8)


def pack_codes(codes: Tensor) -> Tensor:
    """Pack uint8 codes in [0, 15] two per byte along the last dim (channel ``2i`` low nibble, ``2i+1`` high)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., C/2] -> uint8 [..., C]``."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def check_ste(ste: str) -> None:
    if ste not in STES:
        raise ValueError(f"ste must be one of {STES}, got {ste!r}")


def head_group_size(rank: int, num_kv_heads: int) -> int:
    """The official CSKV value group: one group per KV head of a joint latent, ``r / n_kv`` channels (axis=-1)."""
    if num_kv_heads < 1 or rank % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide the rank, got rank={rank}, num_kv_heads={num_kv_heads}")
    return rank // num_kv_heads


def _grouped_minmax_native(x: Tensor, group_size: int, axis: int) -> tuple[Tensor, Tensor]:
    """Per-group min and max in ``x.dtype``, broadcast back to ``x.shape`` (the official code's ``keepdim`` stats)."""
    *lead, t, c = x.shape
    if axis == -2:
        g = x.reshape(*lead, t // group_size, group_size, c)
        mn, mx = g.amin(dim=-2, keepdim=True), g.amax(dim=-2, keepdim=True)
    else:
        g = x.reshape(*lead, t, c // group_size, group_size)
        mn, mx = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    return mn.expand_as(g).reshape(x.shape), mx.expand_as(g).reshape(x.shape)


def _official_scale_zp(x: Tensor, group_size: int, axis: int) -> tuple[Tensor, Tensor]:
    """Eqs. O1–O2 in ``x.dtype`` (expanded to ``x.shape``): ``scale``, integer-valued zero point ``zp`` ∈ [0, 15]."""
    mn, mx = _grouped_minmax_native(x, group_size, axis)
    scale = (mx - mn).clamp(min=OFFICIAL_MIN_RANGE) / QMAX              # Eq. O1
    zp = (-torch.round(mn / scale)).clamp_(0, QMAX)                     # Eq. O2
    return scale, zp


def _official_codes(x: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    """Eq. O3: ``clamp(round(x / scale) + zp, 0, 15)`` in ``x.dtype`` (integer-valued)."""
    return torch.clamp(torch.round(x / scale) + zp, 0, QMAX)


def fake_quant_official(x: Tensor, group_size: int, axis: int = -1) -> Tensor:
    """Eqs. O1–O4 op for op as the official ``KVQuantizer[Channel].forward`` (no autograd wrapper)."""
    axis = check_quantize_inputs(x, group_size, axis)
    scale, zp = _official_scale_zp(x, group_size, axis)
    return (_official_codes(x, scale, zp) - zp) * scale                 # Eq. O4


def clip_mask(x: Tensor, group_size: int, axis: int = -1, scheme: str = "reprise") -> Tensor:
    """Where the ``"clipped"`` STE zeroes the gradient: ``x ≤ lo_g`` or ``x ≥ hi_g`` (module doc; the official
    backward's inclusive ``le``/``ge`` against ``scales·(0 − zeros)`` and ``scales·(15 − zeros)``)."""
    axis = check_quantize_inputs(x, group_size, axis)
    check_scheme(scheme)
    if scheme == "official":
        scale, zp = _official_scale_zp(x, group_size, axis)
        lo, hi = scale * (0 - zp), scale * (QMAX - zp)
    else:
        q = quantize_int4(x, group_size, axis)
        s = _expand_stats(q.scale.float(), x.shape, group_size, axis)
        lo = _expand_stats(q.zero.float(), x.shape, group_size, axis)
        hi = lo + QMAX * s
        x = x.float()
    return x.ge(hi) | x.le(lo)


def quantize_int4(x: Tensor, group_size: int, axis: int = -1, scheme: str = "reprise") -> Int4Tensor:
    """Quantize ``x`` to 4-bit codes with one (scale, zero) per group (Eqs. Q1–Q3 of the module doc).

    Args:
        x: ``[..., T, C]`` float16/bfloat16/float32 tensor, ``C`` even.
        group_size: group length along ``axis``; must divide ``x.shape[axis]`` (and be even if ``axis == -1``).
        axis: ``-2`` = per channel over ``group_size`` consecutive tokens (CSKV/KIVI keys);
            ``-1`` = per token over ``group_size`` consecutive channels (values; ``group_size = C`` is the row).
        scheme: ``"reprise"`` (Eqs. Q1–Q3, zero = min) or ``"official"`` (Eqs. O1–O3, integer zero point clamped
            to [0, 15], stored as ``zero = −zp·scale``).
    """
    axis = check_quantize_inputs(x, group_size, axis)
    check_scheme(scheme)
    if scheme == "official":
        scale, zp = _official_scale_zp(x, group_size, axis)
        codes = _official_codes(x, scale, zp).to(torch.uint8)
        pick = (lambda t: t[..., ::group_size, :]) if axis == -2 else (lambda t: t[..., ::group_size])
        scale_g, zp_g = pick(scale), pick(zp)
        zero_g = -zp_g * scale_g                                        # x̂ = code·scale + zero = (code − zp)·scale
        # clone: a strided pick of a size-1 group dim is "contiguous" yet keeps the full per-element storage alive
        return Int4Tensor(pack_codes(codes).contiguous(), scale_g.clone(), zero_g.clone(),
                          torch.Size(x.shape), group_size, axis)
    x32 = x.float()
    mn, mx = _grouped_minmax(x32, group_size, axis)
    scale = ((mx - mn) / QMAX).to(x.dtype)  # Eq. Q1
    zero = mn.to(x.dtype)  # Eq. Q2
    codes = _codes(x, scale, zero, group_size, axis)
    return Int4Tensor(pack_codes(codes).contiguous(), scale.contiguous(), zero.contiguous(),
                      torch.Size(x.shape), group_size, axis)


def dequantize_int4(q: Int4Tensor) -> Tensor:
    """Eq. Q4: ``x̂ = code * scale + zero`` (computed in fp32, returned in ``q.dtype``)."""
    check_int4_tensor(q)
    codes = unpack_codes(q.packed).float()
    s = _expand_stats(q.scale.float(), q.shape, q.group_size, q.axis)
    z = _expand_stats(q.zero.float(), q.shape, q.group_size, q.axis)
    return (codes * s + z).to(q.dtype)


def cat_int4_tokens(parts: list[Int4Tensor] | tuple[Int4Tensor, ...]) -> Int4Tensor:
    """Concatenate Int4Tensors along the token dim (-2), e.g. to append a completed block to a quantized KV cache.

    All parts must share leading dims, channel count, dtype, ``group_size`` and ``axis``; with ``axis=-2`` each
    part holds whole token groups already (``T_i % group_size == 0``), so codes and stats concatenate directly.
    """
    if not parts:
        raise ValueError("cat_int4_tokens needs at least one Int4Tensor, got an empty sequence")
    first = parts[0]
    for i, p in enumerate(parts):
        check_int4_tensor(p)
        if (p.axis, p.group_size, p.dtype, tuple(p.shape[:-2]), p.shape[-1]) != (
                first.axis, first.group_size, first.dtype, tuple(first.shape[:-2]), first.shape[-1]):
            raise ValueError(f"part {i} (shape {tuple(p.shape)}, axis {p.axis}, group {p.group_size}, {p.dtype}) "
                             f"does not match part 0 (shape {tuple(first.shape)}, axis {first.axis}, "
                             f"group {first.group_size}, {first.dtype})")
    shape = list(first.shape)
    shape[-2] = sum(int(p.shape[-2]) for p in parts)
    cat = lambda name: torch.cat([getattr(p, name) for p in parts], dim=-2)  # noqa: E731
    return Int4Tensor(cat("packed"), cat("scale"), cat("zero"), torch.Size(shape), first.group_size, first.axis)


class _FakeQuantSTE(torch.autograd.Function):
    """``x̂ = fake_quant_fn(x)`` forward; straight-through estimator backward: ``∂x̂/∂x := I`` (``mask_fn`` None) or
    ``I`` with the entries where ``mask_fn(x)`` is True zeroed (the ``"clipped"`` STE)."""

    @staticmethod
    def forward(ctx, x: Tensor, fake_quant_fn, mask_fn) -> Tensor:  # type: ignore[override]
        ctx.clipped = mask_fn is not None
        if ctx.clipped:
            ctx.save_for_backward(mask_fn(x.detach()))
        return fake_quant_fn(x.detach())

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if not ctx.clipped:
            return grad_out, None, None
        (mask,) = ctx.saved_tensors
        return grad_out.masked_fill(mask, 0), None, None


def fake_quant_int4(x: Tensor, group_size: int, axis: int = -1, scheme: str = "reprise",
                    ste: str = "identity") -> Tensor:
    """QAT fake quantization (CSKV §3.3): Eq. Q4 ∘ Eq. Q3 (``scheme="reprise"``) or Eq. O4 ∘ O3 (``"official"``,
    bit-exact to the official forward) in the forward pass; STE backward, ``ste="identity"`` (∂x̂/∂x := I) or
    ``"clipped"`` (the official backward: zero where x ≤ lo_g or x ≥ hi_g, see :func:`clip_mask`)."""
    axis = check_quantize_inputs(x, group_size, axis)
    check_scheme(scheme)
    check_ste(ste)
    if scheme == "official":
        fq = lambda t: fake_quant_official(t, group_size, axis)  # noqa: E731
    else:
        fq = lambda t: dequantize_int4(quantize_int4(t, group_size, axis))  # noqa: E731
    mask_fn = (lambda t: clip_mask(t, group_size, axis, scheme)) if ste == "clipped" else None
    return _FakeQuantSTE.apply(x, fq, mask_fn)


def quant_error(z: Tensor, scheme: str = "reprise", group: int | None = None, axis: int = -1) -> float:
    """Relative squared reconstruction error ``‖z − x̂‖² / ‖z‖²`` of 4-bit quantizing ``z [..., T, C]`` with
    ``scheme`` (``group`` None: the whole row for ``axis=-1``, 32 tokens for ``axis=-2``), computed in fp64."""
    if group is None:
        group = z.shape[-1] if normalize_axis(axis, z.ndim) == -1 else 32
    x_hat = dequantize_int4(quantize_int4(z, group, axis, scheme))
    z64 = z.double()
    return float((z64 - x_hat.double()).pow(2).sum() / z64.pow(2).sum())
