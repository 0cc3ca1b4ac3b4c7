"""GPTQ (Frantar et al. 2022): quantize a weight column by column, feeding each column's rounding
error forward onto the columns not yet quantized, so that the layer output ``X W^T`` moves least.

``HessianAccumulator`` builds ``H = 2/n * sum x x^T`` over the ``n`` input rows ``x`` a layer sees;
``gptq(weight, H, spec)`` returns a ``QuantizedTensor`` in exactly the layout ``quantize`` gives
``spec`` (codes in the original column order, contiguous groups along the input dimension), so
``qt.dequantize()`` and the quantized modules take it as they take ``rtn``'s result.

Qparams follow RTN's rule (``choose_qparams``; with ``mse_clip``, ``qparams_from_range`` of a shrunk
range, the shrink chosen per block by the diag(H)-weighted round-trip error):

| case                                 | qparams fitted on                                             |
|--------------------------------------|---------------------------------------------------------------|
| PerChannel(0)                        | the original weight, one per row                              |
| PerGroup(g), no act_order            | the group's error-updated columns when the sweep reaches it   |
| PerGroup(g), act_order/static_groups | the original weight, per contiguous group, before the sweep   |

Implementation: GPTQ's sweep with the upper Cholesky factor of ``H^-1`` quantizes exactly the values
of the error-feedback form (QuIP's LDLQ, Chee et al. 2023, Thm. 6): with ``H = M D M^T``, ``M`` unit
upper triangular, column ``k`` is quantized at ``w_k - sum_{i<k} e_i M_ik`` (``e`` = quantized minus
original). ``M`` is one Cholesky factor of the reversed ``H``, so the inverse and second factorisation
of the textbook recipe are skipped (~4x fewer flops). Lazy batches as in GPTQ: inside a block of
columns the feedback is rank-1 per column, to the columns after the block one matrix product. The sweep
runs on the transposed weight ``(in, out)`` so that each column is a contiguous row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from lowbit.algorithms.kmeans import kmeans, midpoints, nearest
from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.formats import Format
from lowbit.core.primitives import (
    check_finite,
    choose_qparams,
    level_midpoints,
    qparams_from_range,
    scale_only_codes,
    to_blocks,
)
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec

Tensor = torch.Tensor

_RETRIES = 4  # dampening tried: damp, 10 damp, ..., 10**_RETRIES damp (times mean diag(H))
_MSE_SHRINK = torch.linspace(1.0, 0.7, 16).tolist()  # range fractions the mse_clip search tries
_HESSIAN_BLOCK = 384  # HessianAccumulator computes x^T x in block rows this tall, upper triangle only


def block_rows(n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the ``_HESSIAN_BLOCK``-tall block rows of an ``(n, n)`` Hessian sum; its
    upper part ``[start:stop, start:]`` holds every sum ``HessianAccumulator`` makes."""
    return [(a, min(a + _HESSIAN_BLOCK, n)) for a in range(0, n, _HESSIAN_BLOCK)]


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over input rows; ``n`` counts the rows seen.

    ``dtype`` (float32 or float64) is the accumulation dtype; ``hessian()`` returns float32.
    Products are ``dtype`` matmuls, summed in ``dtype`` (inside ``lowbit.transforms.block``'s bf16
    compute context oneDNN rounds their float32 inputs to bf16 first, still summing in float32). Plain
    bf16 partial sums, though faster with AMX, can lose enough precision to leave a Hessian indefinite.
    """

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32) -> None:
        if in_features < 1:
            raise LowbitError(f"in_features must be >= 1, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise LowbitError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.n = 0
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)

    def update(self, x: Tensor) -> None:
        """Add the rows of ``x`` ``(..., in_features)``, any float dtype."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise LowbitError(f"input shape {tuple(x.shape)} does not end in in_features={self.in_features}")
        rows = x.reshape(-1, self.in_features).to(self._sum.device, self._sum.dtype)
        # upper block rows only (x^T x is symmetric): ~5/8 of the flops for in = 1536 in blocks of 384
        for a, b in block_rows(self.in_features):
            self._sum[a:b, a:].addmm_(rows[:, a:b].t(), rows[:, a:])
        self.n += rows.shape[0]

    @property
    def total(self) -> Tensor:
        """The running sum ``(in, in)`` (upper triangle valid) in the accumulation dtype."""
        return self._sum

    @classmethod
    def from_total(cls, total: Tensor, n: int) -> HessianAccumulator:
        """An accumulator holding ``total`` (e.g. several processes' partial sums, added) over ``n`` rows."""
        acc = cls(total.shape[0], device=total.device, dtype=total.dtype)
        acc._sum, acc.n = total, n
        return acc

    def hessian(self) -> Tensor:
        """``(in, in)`` float32 ``2/n * sum x x^T``; raises ``LowbitError`` before any row."""
        if self.n == 0:
            raise LowbitError("HessianAccumulator saw no input rows (n == 0): run calibration data first")
        h = self._sum.triu().mul_(2.0 / self.n).float()  # the one (in, in) copy
        n = self.in_features
        for a, b in block_rows(n):  # mirror the upper triangle, a block column at a time
            h[b:, a:b] = h[a:b, b:].t()
            diag = h[a:b, a:b]
            diag.copy_(diag + diag.triu(1).t())
        return h


def gptq(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    static_groups: bool = False,
    mse_clip: bool = False,
    name: str = "weight",
    return_values: bool = False,
) -> QuantizedTensor | tuple[QuantizedTensor, Tensor]:
    """GPTQ-quantize ``weight`` ``(out, in)`` given the input Hessian ``hessian`` ``(in, in)``.

    spec: an integer format with PerChannel(0) or PerGroup(g) along the input dimension.
    damp: fraction of mean(diag(H)) added to the diagonal (x10 per retry if H is not positive definite).
    act_order: quantize columns by descending diag(H); with groups the qparams are then static.
    block_size: columns per lazy batch update. static_groups: fit group qparams on the original weight.
    mse_clip: per block, shrink the range to the fraction in 1.0 .. 0.7 (step 0.02) with the least
    diag(H)-weighted squared round-trip error, instead of RTN's full range.
    return_values: also return the float32 ``(out, in)`` values each element was rounded at (the weight
    after the error feedback of the columns before it; rounding them to nearest under the returned
    qparams gives the codes), where block-wise training starts (``lowbit.algorithms.blockap``).
    Works in float32; ``name`` labels errors and warnings.
    """
    group = _check_inputs(weight, hessian, spec, damp, block_size, name)
    w = weight.detach().float()
    h = hessian.detach().to(w.device, torch.float32)  # not modified
    col_w = h.diagonal().clone()  # column importances diag(H)
    perm = torch.argsort(col_w, descending=True, stable=True) if act_order else None
    lazy = group is not None and not (act_order or static_groups)
    fit = _fitter(spec, mse_clip, name)
    levels = None
    if spec.fmt.kind == "table":  # tables fitted once, diag(H)-weighted (``lowbit.algorithms.kmeans``)
        fitted_table = kmeans(w, spec, importance=col_w.clamp_min(0)[None], name=name)
        scale, zp, levels = fitted_table.scale, None, fitted_table.levels
    elif not lazy:
        scale, zp = fit(w, col_w)  # static: from the original weight, before dead columns are zeroed
    wt = w.t()[perm] if perm is not None else w.t().clone(memory_format=torch.contiguous_format)
    if perm is not None:
        col_w = col_w[perm]
    dead = col_w == 0
    if bool(dead.any()):
        wt[dead] = 0.0
    m = _feedback_factor(h, perm, dead, damp, name)
    w0 = wt.clone()  # the sweep adjusts wt in place; errors are measured against w0
    # zero points: int formats, except signed symmetric ones (every zero point 0)
    has_zp = spec.fmt.kind == "int" and not (spec.symmetric and spec.fmt.qmin < 0)
    n = wt.shape[0]
    bounds = set(range(0, n, block_size))
    if lazy:
        fitted: list[tuple[Tensor, Tensor]] = []
        s_cols, z_cols = torch.empty_like(wt), torch.empty_like(wt) if has_zp else None
        refit = _group_refit(wt, w0, m, s_cols, z_cols, group, fit, col_w, fitted)
        bounds |= set(range(0, n, group))  # each group starts a block, its rows fully fed back
    else:
        s_cols, z_cols = _expand_qparams(scale, zp if has_zp else None, n, group, perm)
        refit = None
    table = None if levels is None else levels.float().expand(w.shape[0], -1).contiguous()
    codes = _sweep(wt, w0, m, s_cols, z_cols, spec, sorted(bounds) + [n], refit, table)
    if lazy:
        scale, zp = (None if p[0] is None else torch.cat(p, dim=1) for p in zip(*fitted, strict=True))
    back = None if perm is None else torch.argsort(perm)
    codes = codes.t() if perm is None else codes.t()[:, back]
    codes = codes.to(spec.fmt.torch_dtype, memory_format=torch.contiguous_format)
    qt = QuantizedTensor(codes, scale, zp, spec, levels)
    if not return_values:
        return qt
    return qt, (wt.t() if perm is None else wt.t()[:, back]).contiguous()


def _check_inputs(
    weight: Tensor, hessian: Tensor, spec: QuantSpec, damp: float, block_size: int, name: str
) -> int | None:
    """Validate the arguments; return the group size (None for per-channel)."""
    if weight.ndim != 2:
        raise LowbitError(f"{name}: gptq needs a 2-d (out, in) weight, got shape {tuple(weight.shape)}")
    n_in = weight.shape[1]
    if tuple(hessian.shape) != (n_in, n_in):
        raise LowbitError(
            f"{name}: hessian shape {tuple(hessian.shape)} != ({n_in}, {n_in}) for weight "
            f"shape {tuple(weight.shape)}"
        )
    if spec.format == "binary":
        raise LowbitError(
            f"{name}: gptq needs a format with a grid; binary's scale is the mean |w| (use rtn)"
        )
    if damp < 0 or block_size < 1:
        raise LowbitError(f"{name}: need damp >= 0 and block_size >= 1, got {damp}, {block_size}")
    check_finite(weight, name)
    check_finite(hessian, f"{name} hessian")
    gran = spec.granularity
    if isinstance(gran, PerChannel) and gran.axis in (0, -2):
        return None
    if isinstance(gran, PerGroup) and gran.axis in (1, -1):
        return gran.size
    raise LowbitError(f"{name}: gptq needs PerChannel(0) or PerGroup(g) on the input dim, got {gran}")


def _feedback_factor(h: Tensor, perm: Tensor | None, dead: Tensor, damp: float, name: str) -> Tensor:
    """Unit upper triangular ``M`` (float32) with ``H' = M D M^T``, ``D`` diagonal, where ``H'`` is
    ``H`` in sweep order (``perm``; None: as it is) with dead inputs' (``dead``, sweep order) diagonal
    set to 1, plus ``damp * mean(diag H')`` on the diagonal. ``h`` is not modified.

    From the Cholesky factor ``L`` of the reversed ``H'``: ``M D^1/2 = flip(L)``. One ``(in, in)``
    buffer holds the reversed ``H'``, then ``L`` (``_cholesky_``), then ``M`` (``_reverse_``).
    Retries with 10x the dampening when the factorisation fails; warns naming the dampening that worked.
    """
    rev = None if perm is None else perm.flip(0)
    diag = (h.diagonal().flip(0) if rev is None else h.diagonal()[rev]).masked_fill(dead.flip(0), 1.0)
    base = float(diag.abs().mean())
    lam = damp
    for attempt in range(_RETRIES + 1):
        hd = h.flip(0, 1) if rev is None else h[rev[:, None], rev]  # a copy
        hd.diagonal().copy_(diag + lam * base)
        ok = _cholesky_(hd)
        d = hd.diagonal()
        if ok and bool(torch.isfinite(d.reciprocal()).all()):
            if attempt:
                warnings.warn(
                    f"{name}: Hessian is not positive definite with damp={damp:g}; "
                    f"used damp={lam:g} (fraction of mean diag(H))",
                    stacklevel=3,
                )
            r = _reverse_(hd)  # R = flip(L), upper
            return r.div_(r.diagonal().clone())  # M_ij = R_ij / R_jj
        del hd
        lam = lam * 10 or 0.01
    raise LowbitError(f"{name}: Hessian is not positive definite even with damp={lam / 10:g}")


def _cholesky_(a: Tensor) -> bool:
    """Overwrite the symmetric ``(n, n)`` row-major ``a`` with its lower Cholesky factor; False if the
    factorisation failed. No second ``(n, n)`` buffer: LAPACK factors the column-major view ``a.mT``
    (the same matrix) in place, and its upper factor, read row-major, is the lower one."""
    info = torch.empty((), dtype=torch.int32)
    at = a.mT
    torch.linalg.cholesky_ex(at, upper=True, out=(at, info))
    return int(info) == 0


def _reverse_(a: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``a.flip`` over all dims, in place, ``chunk`` elements at a time (``a`` contiguous)."""
    flat = a.view(-1)
    n = flat.numel()
    half = n // 2
    for k in range(0, half, chunk):
        c = min(chunk, half - k)
        lo, hi = flat[k : k + c], flat[n - k - c : n - k]
        tmp = lo.flip(0)
        lo.copy_(hi.flip(0))
        hi.copy_(tmp)
    return a


Fit = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _fitter(spec: QuantSpec, mse_clip: bool, name: str) -> Fit:
    """The qparam rule: ``(out, k)`` weight and its ``(k,)`` column importances diag(H) -> (scale, zero
    point) of ``spec``'s layout for it."""
    if mse_clip:
        return lambda x, col_w: _mse_qparams(x, spec, col_w)
    return lambda x, col_w: choose_qparams(x, spec, name)


def _mse_qparams(x: Tensor, spec: QuantSpec, col_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per block of ``x``: qparams of the range ``[p lo, p hi]``, ``p`` in ``_MSE_SHRINK`` with the
    least round-trip error ``sum col_w (q - x)^2`` (ties keep the larger ``p``).

    The round trip multiplies by ``1/scale`` where ``quantize`` divides (as PyTorch's fake quantization
    does; faster than ``fake_quantize_per_channel_affine`` itself): the two can differ at exact ties,
    which only sway the search.
    """
    fmt = spec.fmt
    block = spec.block_size(tuple(x.shape))
    xb = to_blocks(x.float(), block)  # (*qshape, block); padding is NaN
    wb = 1.0 if col_w is None else to_blocks(col_w.float().expand_as(x), block).nan_to_num(0.0)
    pad = torch.isnan(xb)
    lo = xb.masked_fill(pad, math.inf).amin(-1)
    hi = xb.masked_fill(pad, -math.inf).amax(-1)
    flat = xb.masked_fill(pad, 0.0).reshape(-1, xb.shape[-1])  # (n_blocks, block)
    wflat = wb if col_w is None else wb.reshape(flat.shape)
    best, levels = None, None if fmt.kind == "int" else grid(fmt, flat.device)
    for p in _MSE_SHRINK:
        scale, zp = qparams_from_range(lo * p, hi * p, spec)
        s = scale.float().reshape(-1, 1)
        z = torch.zeros_like(s) if zp is None else zp.reshape(-1, 1).float()
        if fmt.kind == "int":
            dq = torch.mul(flat, s.reciprocal()).round_().add_(z).clamp_(fmt.qmin, fmt.qmax).sub_(z).mul_(s)
        else:
            dq = snap(torch.mul(flat, s.reciprocal()), fmt, levels).mul_(s)
        err = dq.sub_(flat).square_().mul_(wflat).sum(-1).view(lo.shape)
        if best is None:
            best, b_scale, b_zp = err, scale, zp
            continue
        better = err < best
        best = torch.where(better, err, best)
        b_scale = torch.where(better, scale, b_scale)
        b_zp = None if zp is None else torch.where(better, zp, b_zp)
    return b_scale, b_zp


def _expand_qparams(
    scale: Tensor, zp: Tensor | None, n_in: int, group: int | None, perm: Tensor | None
) -> list[Tensor | None]:
    """Static qparams ``(out, n_groups)`` as float32 ``(in, out)`` per element, in sweep order."""
    rep = n_in if group is None else group
    cols = [None if p is None else p.float().repeat_interleave(rep, dim=1)[:, :n_in].t() for p in (scale, zp)]
    if perm is not None:
        cols = [None if c is None else c[perm] for c in cols]
    return [None if c is None else c.contiguous() for c in cols]


def _sweep(
    wt: Tensor,
    w0: Tensor,
    m: Tensor,
    s_cols: Tensor,
    z_cols: Tensor | None,
    spec: QuantSpec,
    bounds: list[int],
    refit: Callable[[int], None] | None = None,
    table: Tensor | None = None,
) -> Tensor:
    """Quantize the rows of ``wt`` ``(in, out)`` in order, feeding errors forward; returns float codes.

    ``wt`` is adjusted in place (row ``k`` ends as the value it was quantized at); ``w0``: the original
    rows. ``m``: unit upper ``(in, in)`` factor. ``s_cols``/``z_cols``: float32 ``(in, out)`` scale and
    zero point per element (``z_cols`` None: zero point 0). ``bounds``: block starts, then ``in``.
    ``refit(j)``, if given, runs at each block start and may (re)write rows of the qparams. ``table``:
    a table format's ascending levels per output ``(out, K)`` (float32).
    """
    fmt = spec.fmt
    qmin, qmax = fmt.qmin, fmt.qmax
    levels = None if fmt.kind == "int" else grid(fmt, wt.device, table)  # built once, not per column
    codes = torch.empty_like(wt)
    for i1, i2 in zip(bounds[:-1], bounds[1:], strict=False):
        if refit is not None:
            refit(i1)
        w1, m1, s1 = wt[i1:i2], m[i1:i2], s_cols[i1:i2]
        z1 = None if z_cols is None else z_cols[i1:i2]
        # error = (code - zp) * scale - original = code * scale + off, off = -(original + zp * scale)
        off = -w0[i1:i2] if z1 is None else torch.addcmul(w0[i1:i2], z1, s1).neg_()
        err = torch.empty_like(w1)  # (i2 - i1, out)
        rows = zip(w1, codes[i1:i2], err, s1, off, strict=True)
        for i, (w, c, e, s, o) in enumerate(rows):
            if fmt.kind != "int":  # scale-only formats: the level nearest w / s, code = its index
                torch.addcmul(o, snap(torch.div(w, s, out=c), fmt, levels, c), s, out=e)
                w1[i + 1 :].addmm_(m1[i, i1 + i + 1 : i2, None], e[None], alpha=-1.0)
                continue
            torch.div(w, s, out=c).round_()  # ``quantize``'s arithmetic
            if z1 is not None:
                c.add_(z1[i])
            torch.addcmul(o, c.clamp_(qmin, qmax), s, out=e)
            # rank-1 update as a k=1 matrix product: BLAS, far faster than addr_ on CPU
            w1[i + 1 :].addmm_(m1[i, i1 + i + 1 : i2, None], e[None], alpha=-1.0)
        wt[i2:].addmm_(m1[:, i2:].t(), err, alpha=-1.0)
    return codes


def grid(fmt: Format, device: torch.device, table: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(ascending levels, midpoints between them) that ``snap`` rounds to: a codebook's levels ``(K,)``,
    a table format's ``table`` ``(out, K)`` (one row per output); None for float formats."""
    if fmt.kind == "table":
        return table, midpoints(table)
    if fmt.kind == "codebook":
        return level_midpoints(fmt, device)
    return None


def snap(v: Tensor, fmt: Format, levels: tuple[Tensor, Tensor] | None, codes: Tensor | None = None) -> Tensor:
    """Values (before scaling) of a scale-only format nearest ``v = w / scale``, as ``quantize`` rounds:
    the nearest of the ``levels`` (``grid``: a codebook's, or for a table format each element's row of
    the table, ``v`` then ``(out,)``), or the float format's rounding of ``v`` clamped to its range.
    With ``codes`` (``v``'s shape, float), the codes are written there: level indices, or the values."""
    if fmt.kind == "table":
        table, mids = levels
        idx = nearest(v[:, None], table, mids)
        if codes is not None:
            codes.copy_(idx[:, 0])
        return table.gather(1, idx)[:, 0]
    if fmt.kind == "codebook":
        values, mids = levels
        idx = scale_only_codes(v, fmt, mids)
        if codes is not None:
            codes.copy_(idx)
        return values[idx]
    out = scale_only_codes(v, fmt).to(fmt.torch_dtype).float()
    if codes is not None:
        codes.copy_(out)
    return out


def _group_refit(
    wt: Tensor,
    w0: Tensor,
    m: Tensor,
    s_cols: Tensor,
    z_cols: Tensor | None,
    group: int,
    fit: Fit,
    col_w: Tensor,
    out: list,
) -> Callable[[int], None]:
    """``refit`` for ``_sweep``: at a group's first row ``j`` (a block start), fit its qparams on
    GPTQ's error-updated rows and append ``(scale, zero point)`` ``(out, 1)`` to ``out``.

    GPTQ's updated rows are ``w0 + (M_gg^-T)(wt - w0)`` over the group's rows ``g``: the feedback
    received so far, carried through the group's own columns as GPTQ's update does.
    """

    def refit(j: int) -> None:
        if j % group:
            return
        j2 = min(j + group, wt.shape[0])
        fed = wt[j:j2] - w0[j:j2]
        fed = torch.linalg.solve_triangular(m[j:j2, j:j2].t(), fed, upper=False, unitriangular=True)
        scale, zp = fit((w0[j:j2] + fed).t(), col_w[j:j2])
        out.append((scale, zp))
        s_cols[j:j2] = scale.float().t()
        if z_cols is not None:
            z_cols[j:j2] = zp.float().t()

    return refit
