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

import functools
from dataclasses import dataclass

import torch

from .wavelets import GridGeometry, filter_length, grid_geometry, synthesis_filters

DEFAULT_SCALING = 25.0
DEFAULT_WAVELET = "db1"


@dataclass(frozen=True)
class PatchLayout:
    """Per-coefficient geometry: where its patch starts and which filter paints each axis.

    All fields are int64 ``[p]``: ``row_start = 2 kR - (L - 2)``, ``col_start = 2 kQ - (L - 2)``,
    ``row_band = bQ`` (filter along rows), ``col_band = bR`` (filter along columns), and ``synth_row`` /
    ``synth_col``, the coefficient's entry ``(bQ * H2 + kR, bR * W2 + kQ)`` in the sparse factor ``B``.
    """

    geometry: GridGeometry
    row_start: torch.Tensor
    col_start: torch.Tensor
    row_band: torch.Tensor
    col_band: torch.Tensor

    @property
    def synth_row(self) -> torch.Tensor:
        return self.row_band * self.geometry.half_rows + (self.row_start + self.geometry.shift) // 2

    @property
    def synth_col(self) -> torch.Tensor:
        return self.col_band * self.geometry.half_cols + (self.col_start + self.geometry.shift) // 2


def patch_layout(positions: torch.Tensor, shape: tuple[int, int], wavelet: str = DEFAULT_WAVELET) -> PatchLayout:
    """Geometry of the patches of coefficients at flat ``positions`` of an ``(out, in)`` weight."""
    out_features, in_features = int(shape[0]), int(shape[1])
    geometry = grid_geometry(out_features, in_features, wavelet)
    padded_row = torch.div(positions, in_features, rounding_mode="floor") + geometry.pad_rows
    padded_col = positions % in_features + geometry.pad_cols
    band_of_row = (padded_row >= geometry.half_rows).long()
    band_of_col = (padded_col >= geometry.half_cols).long()
    k_row = padded_row - band_of_row * geometry.half_rows
    k_col = padded_col - band_of_col * geometry.half_cols
    return PatchLayout(
        geometry=geometry,
        row_start=2 * k_row - geometry.shift,
        col_start=2 * k_col - geometry.shift,
        row_band=band_of_col,
        col_band=band_of_row,
    )


@dataclass(frozen=True)
class PatchIndex:
    """Where every patch lands, precomputed once per layer and device: each ``[p, L, L]``.

    ``taps[k, a, u] = f_{bQ}[a] * f_{bR}[u]`` (0 where the patch leaves the weight), ``rows``/``cols`` the
    weight entry it paints (0 when clipped), ``flat = rows * in + cols``. ``touched``/``slot`` are the distinct
    flat entries and each tap's slot among them, for adding into half-precision weights with one rounding.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    flat: torch.Tensor
    taps: torch.Tensor
    touched: torch.Tensor
    slot: torch.Tensor


def patch_index(layout: PatchLayout, wavelet: str, device: torch.device | str) -> PatchIndex:
    """Precompute the scatter of :func:`add_delta_` for ``layout`` (no data-dependent shapes at apply time)."""
    geometry = layout.geometry
    filters = synthesis_filters(wavelet, device)
    steps = torch.arange(geometry.filter_len, device=device)
    rows = layout.row_start.to(device)[:, None] + steps
    cols = layout.col_start.to(device)[:, None] + steps
    row_ok = (rows >= 0) & (rows < geometry.out_features)
    col_ok = (cols >= 0) & (cols < geometry.in_features)
    taps = filters[layout.row_band.to(device)][:, :, None] * filters[layout.col_band.to(device)][:, None, :]
    taps = taps * (row_ok[:, :, None] & col_ok[:, None, :])
    rows = torch.where(row_ok, rows, 0)[:, :, None].expand_as(taps).contiguous()
    cols = torch.where(col_ok, cols, 0)[:, None, :].expand_as(taps).contiguous()
    flat = rows * geometry.in_features + cols
    touched, slot = torch.unique(flat, return_inverse=True)
    return PatchIndex(rows, cols, flat, taps, touched, slot)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``, on every torch the hosts ship (A1111 1.10 has 2.1)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument, only per-device functions
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@dataclass
class LayerPlan:
    """What every way of evaluating a layer's update needs: its patch layout and wavelet, and the weight-patch
    index, built on first use only since it holds ~44 bytes per tap (4 MB per SDXL layer for db4) and the
    activation side never needs it. Subclassed by the sparse-kernel and the portable plans."""

    layout: PatchLayout
    wavelet: str

    @functools.cached_property
    def patches(self) -> PatchIndex:
        """Where each of the ``p L^2`` taps lands in ``W``, for patching it in place."""
        return patch_index(self.layout, self.wavelet, self.layout.row_start.device)

    @property
    def patch_entries(self) -> int:
        """``p L^2``, the taps a weight patch writes (without building :attr:`patches`)."""
        return self.layout.row_start.numel() * self.layout.geometry.filter_len**2


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
    out_features, in_features = int(shape[0]), int(shape[1])
    if dense_is_cheaper(positions.numel(), wavelet, (out_features, in_features)):
        from .plans import dense_delta, shared_plan  # the plans build on this module

        plan = shared_plan(positions, (out_features, in_features), wavelet, coef.device)
        return dense_delta(coef, plan, scaling)
    out = torch.zeros(out_features, in_features, dtype=torch.float32, device=coef.device)
    return add_delta_(out, coef, positions, wavelet, scaling)


def coef_grad_from_weight_grad(
    grad_weight: torch.Tensor, layout: PatchLayout, wavelet: str, scaling: float
) -> torch.Tensor:
    """Adjoint of :func:`add_delta_`: ``dL/dc_k = s * <patch_k, dL/dW>`` (a reference for tests)."""
    index = patch_index(layout, wavelet, grad_weight.device)
    picked = grad_weight.to(torch.float32)[index.rows, index.cols]
    return (picked * index.taps).sum(dim=(1, 2)) * float(scaling)
