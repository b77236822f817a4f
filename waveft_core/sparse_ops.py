"""Activation-side WaveFT: ``x dW^T`` and the coefficient gradient without a dense ``dW`` or dense gradient.

With ``dW = s * S_r^T B S_c`` (see :mod:`waveft_core.functional`) and activations ``x`` (``T x in``)::

    x dW^T        = s * ((S_r^T (B (S_c x^T))))^T          three sparse-times-dense products
    g dW          = s * (S_c^T (B^T (S_r g^T)))^T
    dL/dc_k       = s * sum_t (S_r g^T)[r_k, t] * (S_c x^T)[c_k, t]    (a sampled product, one dot per coefficient)

Everything runs "features-major" (``features x tokens``): CPU sparse kernels (CSR times dense, sampled
products) are an order of magnitude faster on contiguous rows than on strided columns, so one transpose of
``x`` and of ``g`` buys the cheap kernels. Costs are O(tokens * (p + L * features)) instead of
O(tokens * out * in). The maths is kept in float32 whatever the activations' dtype.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from .functional import PatchIndex, PatchLayout, patch_index, patch_layout
from .wavelets import synthesis_filters


def _synthesis_matrix(n: int, half: int, wavelet: str, device: torch.device) -> torch.Tensor:
    """CSR ``S`` (``2 half x n``) of one level of 1-D inverse DWT: ``S[b half + k, 2k - (L-2) + t] = f_b[t]``."""
    filters = synthesis_filters(wavelet, device)
    length = filters.shape[1]
    band = torch.arange(2, device=device)[:, None, None]
    k = torch.arange(half, device=device)[None, :, None]
    taps = torch.arange(length, device=device)[None, None, :]
    cols = (2 * k - (length - 2) + taps).expand(2, half, length)
    rows = (band * half + k).expand(2, half, length)
    values = filters[:, None, :].expand(2, half, length)
    keep = (cols >= 0) & (cols < n)
    coo = torch.sparse_coo_tensor(torch.stack([rows[keep], cols[keep]]), values[keep], (2 * half, n))
    return coo.coalesce().to_sparse_csr()


@functools.lru_cache(maxsize=64)
def _synthesis_pair(n: int, half: int, wavelet: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = _synthesis_matrix(n, half, wavelet, device)
    return matrix, matrix.to_sparse_coo().t().coalesce().to_sparse_csr()


def _csr_structure(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, ...]:
    """Row pointers, column indices and the permutation that sorts ``(rows, cols)`` into CSR order."""
    order = torch.argsort(rows * (int(cols.max()) + 1) + cols)
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow, cols[order].contiguous(), order


@dataclass
class SparsePlan:
    """Sparse factors of one layer's ``dW`` (fixed positions, shape and wavelet) on one device."""

    layout: PatchLayout
    wavelet: str
    synth_rows: torch.Tensor  # S_r, CSR (2 H2 x out)
    synth_rows_t: torch.Tensor  # S_r^T, CSR (out x 2 H2)
    synth_cols: torch.Tensor  # S_c, CSR (2 W2 x in)
    synth_cols_t: torch.Tensor  # S_c^T, CSR (in x 2 W2)
    b_crow: torch.Tensor
    b_col: torch.Tensor
    b_order: torch.Tensor  # CSR slot j holds coefficient b_order[j]
    bt_crow: torch.Tensor
    bt_col: torch.Tensor
    bt_order: torch.Tensor
    patches: PatchIndex  # for merging dW into a weight copy

    @property
    def b_shape(self) -> tuple[int, int]:
        g = self.layout.geometry
        return 2 * g.half_rows, 2 * g.half_cols

    def b_matrix(self, coef: torch.Tensor, scaling: float) -> torch.Tensor:
        values = coef.to(torch.float32)[self.b_order] * scaling
        return torch.sparse_csr_tensor(self.b_crow, self.b_col, values, self.b_shape)

    def b_pattern(self) -> torch.Tensor:
        """``B``'s sparsity pattern with unit values, the mask of the sampled gradient product."""
        ones = torch.ones(self.b_order.numel(), dtype=torch.float32, device=self.b_order.device)
        return torch.sparse_csr_tensor(self.b_crow, self.b_col, ones, self.b_shape)

    def bt_matrix(self, coef: torch.Tensor, scaling: float) -> torch.Tensor:
        values = coef.to(torch.float32)[self.bt_order] * scaling
        rows, cols = self.b_shape
        return torch.sparse_csr_tensor(self.bt_crow, self.bt_col, values, (cols, rows))


def build_plan(positions: torch.Tensor, shape: tuple[int, int], wavelet: str, device: torch.device) -> SparsePlan:
    """Precompute the sparse factors for coefficients at flat ``positions`` of an ``(out, in)`` weight."""
    layout = patch_layout(positions.to(device), shape, wavelet)
    g = layout.geometry
    s_r, s_r_t = _synthesis_pair(g.out_features, g.half_rows, wavelet, torch.device(device))
    s_c, s_c_t = _synthesis_pair(g.in_features, g.half_cols, wavelet, torch.device(device))
    rows, cols = layout.synth_row, layout.synth_col
    b_crow, b_col, b_order = _csr_structure(rows, cols, 2 * g.half_rows)
    bt_crow, bt_col, bt_order = _csr_structure(cols, rows, 2 * g.half_cols)
    patches = patch_index(layout, wavelet, device)
    return SparsePlan(
        layout, wavelet, s_r, s_r_t, s_c, s_c_t, b_crow, b_col, b_order, bt_crow, bt_col, bt_order, patches
    )


def _spmm(csr: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``csr @ dense`` for a contiguous dense operand; ``beta=0`` ignores the unset buffer (no zero fill)."""
    out = torch.empty(csr.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def features_major(t: torch.Tensor) -> torch.Tensor:
    """``(..., F)`` activations as a contiguous float32 ``F x tokens`` matrix."""
    return t.reshape(-1, t.shape[-1]).to(torch.float32).t().contiguous()


class _RecentAnalyses(threading.local):
    """``S_c x^T`` of the last few input tensors.

    q, k and v read the same activations, so without this their passes would transpose and analyse one
    tensor three times. Each entry holds a reference to its source tensor, so that tensor's memory cannot be
    recycled for another one while the entry lives; the key includes the version counter, so an in-place
    change is never served stale.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def analyse(self, x: torch.Tensor, synthesis: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype, x.device, id(synthesis))
        for source, cached_key, result in self.entries:
            if cached_key == key and source.data_ptr() == x.data_ptr():
                return result
        result = _spmm(synthesis, features_major(x))
        self.entries = [(x, key, result), *self.entries[: self.size - 1]]
        return result


_RECENT = _RecentAnalyses()


def analyse_inputs(x: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """``S_c x^T`` (``2 W2 x T``) for input activations ``x`` (``..., in``); reused across q, k, v."""
    return _RECENT.analyse(x.detach(), plan.synth_cols)


def delta_forward(x_analysed: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float) -> torch.Tensor:
    """``(x dW^T)^T`` (``out x T``) from ``S_c x^T`` (``2 W2 x T``)."""
    mixed = _spmm(plan.b_matrix(coef, scaling), x_analysed)
    return _spmm(plan.synth_rows_t, mixed)


def delta_input_grad(g_analysed: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float) -> torch.Tensor:
    """``(g dW)^T`` (``in x T``) from ``S_r g^T`` (``2 H2 x T``)."""
    mixed = _spmm(plan.bt_matrix(coef, scaling), g_analysed)
    return _spmm(plan.synth_cols_t, mixed)


def coef_grad(g_analysed: torch.Tensor, x_analysed: torch.Tensor, plan: SparsePlan, scaling: float) -> torch.Tensor:
    """``dL/dc`` (float32 ``[p]``): one dot product of analysed rows per coefficient (a sampled product)."""
    sampled = torch.sparse.sampled_addmm(plan.b_pattern(), g_analysed, x_analysed.t(), beta=0.0).values()
    grad = torch.empty_like(sampled)
    grad[plan.b_order] = sampled * scaling
    return grad


def analyse_outputs(g: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """``S_r g^T`` (``2 H2 x T``) for output-side activations or gradients ``g`` (``..., out``)."""
    return _spmm(plan.synth_rows, features_major(g))
