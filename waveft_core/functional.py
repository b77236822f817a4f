"""Pure tensor maths of WaveFT: the update ``dW = s * IDWT2(C)`` as a sum of ``p`` separable patches.

One level of 2-D inverse DWT with zero boundary (``pywt.idwt2(..., mode="zero")``, which is what PEFT's
``waverec2d`` computes) maps a coefficient at padded grid position ``(R, Q)`` to an ``L x L`` patch. With
``bR = [R >= H2]``, ``kR = R - bR * H2`` (likewise ``bQ``, ``kQ`` for the column) and ``f_0 = rec_lo``,
``f_1 = rec_hi``::

    dW[2 kR - (L - 2) + a, 2 kQ - (L - 2) + u] += s * c * f_{bQ}[a] * f_{bR}[u]     (0 <= a, u < L)

(the row filter follows the *column* band: PEFT's quadrant ``cH = C[:H2, W2:]`` is high-pass along rows),
clipped to the ``out x in`` weight. Equivalently ``dW = s * S_r^T B S_c`` where ``S_r`` (``2 H2 x out``) and
``S_c`` (``2 W2 x in``) are single-level 1-D synthesis matrices (rows ordered band-major: all ``lo`` then all
``hi``) and ``B`` is a sparse ``2 H2 x 2 W2`` matrix with the ``p`` values ``c`` at
``(bQ * H2 + kR, bR * W2 + kQ)``. :mod:`waveft_core.sparse_ops` uses that factorisation; this module paints
patches, which is what patching a weight needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._torch_compat import autocast_enabled  # noqa: F401  (re-exported: older call sites)
from .geometry import DEFAULT_WAVELET, PatchIndex, patch_index, patch_layout
from .plans import dense_delta, shared_plan
from .wavelets import filter_length

DEFAULT_SCALING = 25.0


def add_delta_(
    weight: torch.Tensor,
    coef: torch.Tensor,
    positions: torch.Tensor,
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
    strength: float = 1.0,
    index: PatchIndex | None = None,
) -> torch.Tensor:
    """``weight += strength * s * IDWT2(C)`` in place, as a scatter-add of ``p`` patches of ``L x L``.

    Works for any floating dtype, layout and device. Half-precision weights get the patches summed in
    float32 and rounded once per touched entry, so the result equals ``weight += strength * delta_weight()``.
    ``index`` (from :func:`patch_index`) skips the geometry work when a layer is applied repeatedly.
    Returns ``weight``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if index is None:
        index = patch_index(patch_layout(positions, tuple(weight.shape), wavelet), wavelet, weight.device)
    values = index.taps * (coef.detach().to(weight.device, torch.float32) * (float(scaling) * float(strength)))[:, None, None]
    if weight.dtype == torch.float32 and weight.is_contiguous():
        weight.view(-1).index_add_(0, index.flat.view(-1), values.view(-1))
    elif weight.dtype == torch.float32:
        weight.index_put_((index.rows.view(-1), index.cols.view(-1)), values.view(-1), accumulate=True)
    else:
        summed = torch.zeros(index.touched.numel(), device=weight.device, dtype=torch.float32)
        summed.index_add_(0, index.slot.view(-1), values.view(-1))
        if weight.is_contiguous():
            flat = weight.view(-1)
            current = flat.index_select(0, index.touched).to(torch.float32)
            flat.index_copy_(0, index.touched, (current + summed).to(weight.dtype))
        else:
            rows = torch.div(index.touched, weight.shape[1], rounding_mode="floor")
            cols = index.touched % weight.shape[1]
            weight[rows, cols] = (weight[rows, cols].to(torch.float32) + summed).to(weight.dtype)
    return weight


def with_delta(weight: torch.Tensor, coef: torch.Tensor, index: PatchIndex, scaling: float = DEFAULT_SCALING) -> torch.Tensor:
    """``W + s * IDWT2(C)`` as a new float32 tensor, differentiable in ``coef`` (and ``W``): autograd's
    out-of-place ``index_add`` of the ``p L^2`` taps, the weight-side form a host's training wrapper needs.

    ``weight`` is 2-D ``(out, in)`` and ``index`` its :func:`patch_index`.
    """
    values = index.taps * (coef.to(torch.float32) * float(scaling))[:, None, None]
    flat = weight.to(torch.float32).reshape(-1).index_add(0, index.flat.reshape(-1), values.reshape(-1))
    return flat.view(weight.shape)


DENSE_MIN_TAPS = 1 << 16
INDEX_BYTES_PER_TAP = 44  # a PatchIndex: rows, cols, flat, slot (int64) and taps (float32) per tap, + touched


def dense_is_cheaper(p: int, wavelet: str, shape: tuple[int, int]) -> bool:
    """Whether ``dW`` is built from the separable factors rather than by painting its ``p L^2`` taps: when the
    taps are many enough to matter and their index would outgrow a float32 copy of the weight.

    That bounds what applying a layer keeps by the layer's own size (a 33 KB file of long-filter layers used
    to build 290 MB of index per SDXL layer); the separable build is as fast there (1280 x 1280: painting
    wins only below about db10 at the default budget) and Haar at usual budgets keeps its bit-exact painting.
    """
    taps = p * filter_length(wavelet) ** 2
    return taps > DENSE_MIN_TAPS and taps * INDEX_BYTES_PER_TAP > 4 * shape[0] * shape[1]


def delta_weight(
    coef: torch.Tensor,
    positions: torch.Tensor,
    shape: tuple[int, int],
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
) -> torch.Tensor:
    """Dense float32 ``dW = s * crop(IDWT2(C))`` of shape ``shape``; equals PEFT's ``get_delta_weight``.

    Short filters paint the ``p L^2`` taps; when those number over half of ``dW``'s entries (long filters) the
    separable factors build it in ``O(L * out * in)`` without a tap index (see ``plans.dense_delta``).
    """
    out = torch.zeros(int(shape[0]), int(shape[1]), dtype=torch.float32, device=coef.device)
    return add_update_(out, coef, positions, wavelet, scaling)


def add_update_(
    weight: torch.Tensor,
    coef: torch.Tensor,
    positions: torch.Tensor,
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
    strength: float = 1.0,
    index: Callable[[torch.device], PatchIndex] | None = None,
) -> torch.Tensor:
    """``weight += strength * dW`` in place, the one place that decides how: painting the ``p L^2`` taps
    (:func:`add_delta_`, with ``index(device)`` supplying a cached tap index) or, past :func:`dense_is_cheaper`,
    the dense ``dW`` from the separable factors (no tap index). Half precision is summed in float32 and
    rounded once either way. Returns ``weight``."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if dense_is_cheaper(positions.numel(), wavelet, shape):
        plan = shared_plan(positions, shape, wavelet, weight.device)
        delta = dense_delta(coef.to(weight.device), plan, scaling * float(strength))
        with torch.no_grad():
            return weight.copy_(weight.to(torch.float32) + delta)
    cached = None if index is None else index(weight.device)
    return add_delta_(weight, coef, positions, wavelet, scaling, strength, index=cached)
