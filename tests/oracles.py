"""Independent references for WaveFT's dW: PyWavelets' idwt2, ptwt's waverec2 (what PEFT's authors
specify, in torch) and PEFT's own WaveFT code."""

from __future__ import annotations

import numpy as np
import pywt
import torch

from waveft_core.geometry import PatchLayout, patch_index
from waveft_core.wavelets import grid_geometry


def padded_grid(coef: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int], wavelet: str) -> np.ndarray:
    out_features, in_features = shape
    geometry = grid_geometry(out_features, in_features, wavelet)
    grid = np.zeros((2 * geometry.half_rows, 2 * geometry.half_cols))
    rows = positions.numpy() // in_features + geometry.pad_rows
    cols = positions.numpy() % in_features + geometry.pad_cols
    grid[rows, cols] = coef.double().numpy()
    return grid


def pywt_delta(coef, positions, shape, wavelet, scaling) -> torch.Tensor:
    """``s * crop(pywt.idwt2((cA, (cH, cV, cD)), wavelet, mode="zero"))`` on PEFT's padded grid (float64)."""
    grid = padded_grid(coef, positions, shape, wavelet)
    h2, w2 = grid.shape[0] // 2, grid.shape[1] // 2
    bands = (grid[:h2, :w2], (grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:]))
    rebuilt = pywt.idwt2(bands, wavelet, mode="zero") * scaling
    return torch.from_numpy(rebuilt[: shape[0], : shape[1]].copy())


def ptwt_delta(coef, positions, shape, wavelet, scaling) -> torch.Tensor:
    """``s * crop(ptwt.waverec2((cA, (cH, cV, cD)), wavelet))`` on PEFT's padded grid (float64): the
    construction DESIGN.md names, by a third implementation (torch convolutions, zero boundary)."""
    import ptwt

    grid = torch.from_numpy(padded_grid(coef, positions, shape, wavelet))
    h2, w2 = grid.shape[0] // 2, grid.shape[1] // 2
    bands = (grid[None, :h2, :w2], (grid[None, :h2, w2:], grid[None, h2:, :w2], grid[None, h2:, w2:]))
    rebuilt = ptwt.waverec2(bands, pywt.Wavelet(wavelet))[0] * scaling
    return rebuilt[: shape[0], : shape[1]]


def peft_delta(coef, positions, shape, wavelet, scaling) -> torch.Tensor:
    """PEFT's WaveFTLayer.get_delta_weight on an nn.Linear with the same positions."""
    from peft.tuners.waveft.config import WaveFTConfig
    from peft.tuners.waveft.layer import WaveFTLinear

    out_features, in_features = shape
    config = WaveFTConfig(n_frequency=coef.numel(), scaling=scaling, wavelet_family=wavelet)
    layer = WaveFTLinear(torch.nn.Linear(in_features, out_features), "default", config, n_frequency=coef.numel())
    layer.waveft_indices["default"] = torch.stack([positions // in_features, positions % in_features])
    with torch.no_grad():
        layer.waveft_spectrum["default"].copy_(coef)
    return layer.get_delta_weight("default").detach()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def coef_grad_from_weight_grad(
    grad_weight: torch.Tensor, layout: PatchLayout, wavelet: str, scaling: float
) -> torch.Tensor:
    """Adjoint of :func:`add_delta_`: ``dL/dc_k = s * <patch_k, dL/dW>`` (a reference for tests)."""
    index = patch_index(layout, wavelet, grad_weight.device)
    picked = grad_weight.to(torch.float32)[index.rows, index.cols]
    return (picked * index.taps).sum(dim=(1, 2)) * float(scaling)


def linear_reference(layer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A ``WaveFTLinear``'s ``y = x (W + dW)^T + b``, ``dL/dx`` and ``dL/dc`` in float64 on the CPU from the same
    (rounded) inputs, flattened to ``(tokens, features)``; ``dW`` built densely by ``delta_weight``."""
    from waveft_core import delta_weight
    from waveft_core.geometry import patch_layout

    weight, bias = layer.base.weight.detach().cpu().double(), layer.base.bias.detach().cpu().double()
    coef = layer.coef.detach().cpu()
    dense = delta_weight(coef, layer.positions, layer.shape, layer.wavelet, layer.scaling).double()
    x64 = x.detach().cpu().double().reshape(-1, layer.shape[1])
    g64 = grad.detach().cpu().double().reshape(-1, layer.shape[0])
    layout = patch_layout(layer.positions, layer.shape, layer.wavelet)
    grad_coef = coef_grad_from_weight_grad(g64.T @ x64, layout, layer.wavelet, layer.scaling)
    return x64 @ (weight + dense).T + bias, g64 @ (weight + dense), grad_coef
