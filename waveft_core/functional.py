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

from dataclasses import dataclass

import torch

from .wavelets import GridGeometry, grid_geometry, synthesis_filters

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


def _patch_entries(
    layout: PatchLayout, values: torch.Tensor, wavelet: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[p, L, 1]``, columns ``[p, 1, L]`` and values ``[p, L, L]`` of all patches.

    Entries that fall outside the weight get value 0 and index 0, so no data-dependent shapes (and no
    device sync) are needed.
    """
    geometry = layout.geometry
    filters = synthesis_filters(wavelet, values.device)
    taps = torch.arange(geometry.filter_len, device=values.device)
    rows = layout.row_start.to(values.device)[:, None] + taps
    cols = layout.col_start.to(values.device)[:, None] + taps
    row_filter = filters[layout.row_band.to(values.device)]
    col_filter = filters[layout.col_band.to(values.device)]
    patch = values[:, None, None] * row_filter[:, :, None] * col_filter[:, None, :]
    if geometry.shift or geometry.out_features % 2 or geometry.in_features % 2:
        row_ok = (rows >= 0) & (rows < geometry.out_features)
        col_ok = (cols >= 0) & (cols < geometry.in_features)
        patch = patch * (row_ok[:, :, None] & col_ok[:, None, :])
        rows = torch.where(row_ok, rows, 0)
        cols = torch.where(col_ok, cols, 0)
    return rows[:, :, None], cols[:, None, :], patch


def add_delta_(
    weight: torch.Tensor,
    coef: torch.Tensor,
    positions: torch.Tensor,
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
    strength: float = 1.0,
    layout: PatchLayout | None = None,
) -> torch.Tensor:
    """``weight += strength * s * IDWT2(C)`` in place, as a scatter-add of ``p`` patches of ``L x L``.

    Works for any floating dtype and device; the patches are summed in float32 and rounded into ``weight``
    once per touched entry, so the result equals ``weight += strength * delta_weight(...)``. Returns ``weight``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if layout is None:
        layout = patch_layout(positions, tuple(weight.shape), wavelet)
    values = coef.detach().to(device=weight.device, dtype=torch.float32) * (float(scaling) * float(strength))
    rows, cols, patch = _patch_entries(layout, values, wavelet)
    rows, cols = rows.expand_as(patch).reshape(-1), cols.expand_as(patch).reshape(-1)
    if weight.dtype == torch.float32:
        weight.index_put_((rows, cols), patch.reshape(-1), accumulate=True)
        return weight
    flat = rows * weight.shape[1] + cols
    touched, slot = torch.unique(flat, return_inverse=True)
    summed = torch.zeros(touched.numel(), device=weight.device, dtype=torch.float32)
    summed.index_add_(0, slot, patch.reshape(-1))
    touched_rows = torch.div(touched, weight.shape[1], rounding_mode="floor")
    touched_cols = touched % weight.shape[1]
    current = weight[touched_rows, touched_cols].to(torch.float32)
    weight[touched_rows, touched_cols] = (current + summed).to(weight.dtype)
    return weight


def delta_weight(
    coef: torch.Tensor,
    positions: torch.Tensor,
    shape: tuple[int, int],
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
) -> torch.Tensor:
    """Dense float32 ``dW = s * crop(IDWT2(C))`` of shape ``shape``; equals PEFT's ``get_delta_weight``."""
    out = torch.zeros(int(shape[0]), int(shape[1]), dtype=torch.float32, device=coef.device)
    return add_delta_(out, coef, positions, wavelet, scaling)


def coef_grad_from_weight_grad(
    grad_weight: torch.Tensor, layout: PatchLayout, wavelet: str, scaling: float
) -> torch.Tensor:
    """Adjoint of :func:`add_delta_`: ``dL/dc_k = s * <patch_k, dL/dW>`` (for tests and small layers)."""
    ones = torch.ones(layout.row_start.numel(), device=grad_weight.device, dtype=torch.float32)
    rows, cols, patch = _patch_entries(layout, ones, wavelet)
    picked = grad_weight.to(torch.float32)[rows.expand_as(patch), cols.expand_as(patch)]
    return (picked * patch).sum(dim=(1, 2)) * float(scaling)
