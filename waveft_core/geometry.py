"""Where a layer's coefficients land: the patch layout on the padded grid and the weight-patch index.

A coefficient at padded grid position ``(R, Q)`` paints an ``L x L`` patch of ``dW`` (see
:mod:`waveft_core.functional` for the maths): :class:`PatchLayout` holds, per coefficient, the band of its row
and column and the patch's top-left corner; :class:`PatchIndex` the flat weight entries and filter products
of all ``p L^2`` taps. Every kernel family (:mod:`~waveft_core.sparse_ops`, :mod:`~waveft_core.portable_ops`)
plans on this geometry; nothing here evaluates an update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .wavelets import GridGeometry, grid_geometry, synthesis_filters

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
