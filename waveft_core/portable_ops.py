"""Activation-side WaveFT from convolutions and gathers only: for devices without sparse CSR kernels.

Same maths as :mod:`waveft_core.sparse_ops` (``dW = s * S_r^T B S_c``), other kernels. Applying ``S^T``
(one level of 1-D DWT analysis along the features) is a stride-2 correlation with the synthesis filters
``f_b``, and applying ``S`` a stride-2 transposed convolution::

    (x S^T)[:, b H + k] = sum_t f_b[t] x[:, 2k - (L-2) + t]          conv1d, zero padding
    (y S)[:, j]         = sum_{b,k} y[:, b H + k] f_b[j - 2k + L - 2]  conv_transpose1d, cropped

and the sparse ``B`` (``p`` values ``b_k = s c_k`` at ``(r_k, q_k)``) is a gather and an index-add over its
``p`` entries::

    x dW^T        = synth_r(Y),  Y[:, r_k] += b_k Xa[:, q_k]     with Xa = x S_c^T (tokens-major)
    g dW          = synth_c(Z),  Z[:, q_k] += b_k Ga[:, r_k]     with Ga = g S_r^T
    dL/dc_k       = s * sum_t Ga[t, r_k] Xa[t, q_k]

Every op here exists on every torch backend (Apple's MPS could not even build a sparse CSR tensor in 2026,
pytorch/pytorch#129842), and no activation is transposed. Costs are ``O(tokens * (p + L * features))`` as on the sparse path, with
``tokens x p`` gathered temporaries, bounded by chunking the tokens. Maths in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._torch_compat import autocast_enabled
from .geometry import LayerPlan, patch_layout
from .wavelets import synthesis_filters

CHUNK_ELEMENTS = 1 << 22  # per temporary: 16 MB of float32


@dataclass
class PortablePlan(LayerPlan):
    """One layer's ``B`` entries and the 1-D synthesis filters, on one device."""

    filters: torch.Tensor  # (2, 1, L) float32: f_0 = rec_lo, f_1 = rec_hi, as conv weights
    rows: torch.Tensor  # r_k: row of coefficient k in B (2 H2 x 2 W2), int64
    cols: torch.Tensor  # q_k: its column


def build_portable_plan(positions: torch.Tensor, shape: tuple[int, int], wavelet: str, device: torch.device) -> PortablePlan:
    """The plan of :func:`waveft_core.sparse_ops.build_plan` without CSR tensors."""
    layout = patch_layout(positions.to(device), shape, wavelet)
    filters = synthesis_filters(wavelet, device)[:, None, :].contiguous()
    return PortablePlan(layout, wavelet, filters, layout.synth_row.contiguous(), layout.synth_col.contiguous())


def analyse(t: torch.Tensor, half: int, filters: torch.Tensor) -> torch.Tensor:
    """``t S^T``: ``(N, n)`` float32 rows to ``(N, 2 half)`` band-major coefficients (all lo, then all hi)."""
    rows, n = t.shape
    shift = filters.shape[-1] - 2
    padded = F.pad(t[:, None, :], (shift, max(0, 2 * half - n)))
    return F.conv1d(padded, filters, stride=2)[..., :half].reshape(rows, 2 * half)


def synthesise(y: torch.Tensor, n: int, filters: torch.Tensor) -> torch.Tensor:
    """``y S``: ``(N, 2 half)`` band-major coefficients to ``(N, n)`` float32 rows."""
    rows, width = y.shape
    shift = filters.shape[-1] - 2
    full = F.conv_transpose1d(y.reshape(rows, 2, width // 2), filters, stride=2)
    return full[:, 0, shift : shift + n]


def _float32_maths(device: torch.device) -> contextlib.AbstractContextManager:
    # autocast would run the convolutions in half precision; the update is float32 maths, as on the sparse path
    return torch.autocast(device.type, enabled=False) if autocast_enabled(device.type) else contextlib.nullcontext()


def _chunk_tokens(plan: PortablePlan) -> int:
    """Tokens per chunk, so that each ``tokens x p`` or ``tokens x features`` temporary stays near
    ``CHUNK_ELEMENTS`` values whatever the resolution."""
    g = plan.layout.geometry
    widest = max(plan.rows.numel(), 2 * g.half_rows, 2 * g.half_cols, g.out_features, g.in_features)
    return max(1, CHUNK_ELEMENTS // widest)


def portable_delta_forward(
    x: torch.Tensor, coef: torch.Tensor, plan: PortablePlan, scaling: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x dW^T`` (``(T, out)``, rounded once to ``dtype``) for activations ``x`` flattened to ``(T, in)``."""
    g = plan.layout.geometry
    out = torch.empty(x.shape[0], g.out_features, dtype=dtype, device=x.device)
    b_values = coef.to(torch.float32) * float(scaling)
    step = _chunk_tokens(plan)
    with _float32_maths(x.device):
        for start in range(0, x.shape[0], step):
            x_analysed = analyse(x[start : start + step].to(torch.float32), g.half_cols, plan.filters)
            mixed = torch.zeros(x_analysed.shape[0], 2 * g.half_rows, dtype=torch.float32, device=x.device)
            mixed.index_add_(1, plan.rows, x_analysed.index_select(1, plan.cols) * b_values)
            out[start : start + step] = synthesise(mixed, g.out_features, plan.filters)
    return out


def portable_delta_backward(
    grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, plan: PortablePlan, scaling: float, input_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dc`` (float32 ``[p]``) and, if ``input_grad``, ``g dW`` in ``x``'s dtype (see the module docstring)."""
    g = plan.layout.geometry
    grad_coef = torch.zeros(plan.rows.numel(), dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape[0], g.in_features, dtype=x.dtype, device=x.device) if input_grad else None
    b_values = coef.to(torch.float32) * float(scaling)
    step = _chunk_tokens(plan)
    with _float32_maths(x.device):
        for start in range(0, x.shape[0], step):
            g_analysed = analyse(grad[start : start + step].to(torch.float32), g.half_rows, plan.filters)
            g_picked = g_analysed.index_select(1, plan.rows)
            x_analysed = analyse(x[start : start + step].to(torch.float32), g.half_cols, plan.filters)
            grad_coef += (g_picked * x_analysed.index_select(1, plan.cols)).sum(0)
            del x_analysed
            if grad_x is not None:
                mixed = torch.zeros(g_picked.shape[0], 2 * g.half_cols, dtype=torch.float32, device=x.device)
                mixed.index_add_(1, plan.cols, g_picked * b_values)
                grad_x[start : start + step] = synthesise(mixed, g.in_features, plan.filters)
    return grad_coef * float(scaling), grad_x


def portable_dense_delta(coef: torch.Tensor, plan: PortablePlan, scaling: float) -> torch.Tensor:
    """``dW = s * S_r^T B S_c`` as a dense float32 ``(out, in)`` matrix: ``B S_c``, then ``S_r^T`` of that."""
    g = plan.layout.geometry
    b = torch.zeros(2 * g.half_rows, 2 * g.half_cols, dtype=torch.float32, device=plan.rows.device)
    b[plan.rows, plan.cols] = coef.detach().to(b) * float(scaling)
    with _float32_maths(b.device):
        b_s_c = synthesise(b, g.in_features, plan.filters)  # 2 H2 x in
        return synthesise(b_s_c.t().contiguous(), g.out_features, plan.filters).t().contiguous()
