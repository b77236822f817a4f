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
import warnings
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
    indices = torch.stack([rows[keep], cols[keep]])
    coo = torch.sparse_coo_tensor(indices, values[keep], (2 * half, n), check_invariants=False)
    return _coo_to_csr(coo)


def _coo_to_csr(coo: torch.Tensor) -> torch.Tensor:
    rows, cols = coo.coalesce().indices()
    crow, col, order = _csr_structure(rows, cols, coo.shape[0])
    return _csr(crow, col, coo.coalesce().values()[order], tuple(coo.shape))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # torch warns once per process that CSR support is "beta": noise in a host's console, not a user problem
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@functools.lru_cache(maxsize=64)
def _synthesis_pair(n: int, half: int, wavelet: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = _synthesis_matrix(n, half, wavelet, device)
    return matrix, _coo_to_csr(matrix.to_sparse_coo().t())


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
        return _csr(self.b_crow, self.b_col, values, self.b_shape)

    def b_pattern(self) -> torch.Tensor:
        """``B``'s sparsity pattern with unit values, the mask of the sampled gradient product."""
        ones = torch.ones(self.b_order.numel(), dtype=torch.float32, device=self.b_order.device)
        return _csr(self.b_crow, self.b_col, ones, self.b_shape)

    def bt_matrix(self, coef: torch.Tensor, scaling: float) -> torch.Tensor:
        values = coef.to(torch.float32)[self.bt_order] * scaling
        rows, cols = self.b_shape
        return _csr(self.bt_crow, self.bt_col, values, (cols, rows))


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
    """``(T, F)`` activations as a contiguous float32 ``F x T`` matrix."""
    return t.to(torch.float32).t().contiguous()


def token_chunks(tokens: int, plan: SparsePlan) -> range:
    """Chunk starts over the tokens, so each features-major temporary holds at most ~``CHUNK_ELEMENTS``.

    The transposed copies and analyses are memory the frozen base does not need; chunking keeps that extra
    peak to a few MB whatever the resolution, at the price of a few more (cheap) kernel launches.
    """
    g = plan.layout.geometry
    widest = max(2 * g.half_rows, 2 * g.half_cols)
    return range(0, tokens, max(64, CHUNK_ELEMENTS // widest))


CHUNK_ELEMENTS = 1 << 19


def delta_forward(x: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float) -> torch.Tensor:
    """``x dW^T`` (float32, ``(T, out)``) for activations ``x`` flattened to ``(T, in)``."""
    g = plan.layout.geometry
    out = torch.empty(x.shape[0], g.out_features, dtype=torch.float32, device=x.device)
    b_matrix = plan.b_matrix(coef, scaling)
    step = token_chunks(x.shape[0], plan).step
    for start in token_chunks(x.shape[0], plan):
        analysed = _spmm(plan.synth_cols, features_major(x[start : start + step]))
        out[start : start + step] = _spmm(plan.synth_rows_t, _spmm(b_matrix, analysed)).t()
    return out


def delta_backward(
    grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float, input_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dc`` (float32 ``[p]``) and, if ``input_grad``, ``g dW`` (float32 ``(T, in)``).

    ``grad`` and ``x`` are flattened to ``(T, out)`` and ``(T, in)``. Per token chunk:
    ``dL/dc_k += s * sum_t (S_r g^T)[r_k, t] (S_c x^T)[c_k, t]`` -- one sampled dot product per coefficient.
    """
    g = plan.layout.geometry
    sampled = torch.zeros(plan.b_order.numel(), dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape[0], g.in_features, dtype=torch.float32, device=x.device) if input_grad else None
    pattern = plan.b_pattern()
    bt_matrix = plan.bt_matrix(coef, scaling) if input_grad else None
    step = token_chunks(x.shape[0], plan).step
    for start in token_chunks(x.shape[0], plan):
        g_analysed = _spmm(plan.synth_rows, features_major(grad[start : start + step]))
        x_analysed = _spmm(plan.synth_cols, features_major(x[start : start + step]))
        sampled += torch.sparse.sampled_addmm(pattern, g_analysed, x_analysed.t(), beta=0.0).values()
        del x_analysed
        if grad_x is not None:
            grad_x[start : start + step] = _spmm(plan.synth_cols_t, _spmm(bt_matrix, g_analysed)).t()
    grad_coef = torch.empty_like(sampled)
    grad_coef[plan.b_order] = sampled * scaling
    return grad_coef, grad_x
