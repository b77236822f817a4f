"""Coefficient gradients of attached WaveFT layers equal the dense formula.

Reference: ``dW(c) = sum_k c_k B_k`` with ``B_k = delta_weight(e_k)`` (``dW`` is linear in ``c``), so the dense
model ``y = x (W + dW(c))^T + b`` is differentiable in ``c`` by plain autograd. The attached model must give
the same ``dL/dc`` on every evaluation path: weight-side (float32, frozen base), activation-side (trainable
base) and activation-side under bf16 autocast (compared loosely: bf16 rounds the base matmuls).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_toys import one_thread  # noqa: F401  (an autouse fixture)

from waveft_core import WaveFTConfig, attach_waveft, delta_weight, waveft_layers


class TwoLayers(nn.Module):
    def __init__(self, d_in: int, d_mid: int, d_out: int) -> None:
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(d_in, d_mid)
        self.attn1.to_out = nn.ModuleList([nn.Linear(d_mid, d_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn1.to_out[0](torch.tanh(self.attn1.to_q(x)))


def dense_basis(layer) -> torch.Tensor:
    """``[out * in, p]``: column ``k`` is ``delta_weight`` of the ``k``-th unit coefficient vector."""
    p = layer.coef.numel()
    eye = torch.eye(p)
    columns = [delta_weight(eye[k], layer.positions, layer.shape, layer.wavelet, layer.scaling) for k in range(p)]
    return torch.stack([c.reshape(-1) for c in columns], dim=1)


def dense_reference(model: TwoLayers, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    layers = waveft_layers(model)
    leaves = {name: layer.coef.detach().clone().requires_grad_(True) for name, layer in layers.items()}
    h = x
    for name in ("attn1.to_q", "attn1.to_out.0"):
        layer = layers[name]
        weight = layer.base.weight + (dense_basis(layer) @ leaves[name]).reshape(layer.shape)
        h = F.linear(h, weight, layer.base.bias)
        if name == "attn1.to_q":
            h = torch.tanh(h)
    (h * upstream).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("wavelet, dims", [("db1", (10, 12, 8)), ("db1", (9, 13, 7)), ("db3", (16, 14, 11))])
@pytest.mark.parametrize("path", ["weight_side", "activation_side", "autocast_bf16"])
def test_coef_grads_equal_dense_formula(wavelet, dims, path):
    torch.manual_seed(0)
    model = TwoLayers(*dims)
    attach_waveft(model, WaveFTConfig(n_frequency=20, wavelet=wavelet, scaling=3.0, target_pattern=r"attn1\."))
    layers = waveft_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.coef.normal_(0, 0.05)  # non-zero, so the second layer's gradient sees the first's dW
    if path == "activation_side":
        for layer in layers.values():
            layer.base.weight.requires_grad_(True)
    x = torch.randn(2, 5, dims[0])
    upstream = torch.randn(2, 5, dims[2])
    expected = dense_reference(model, x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "autocast_bf16"):
        out = model(x)
    (out.float() * upstream).sum().backward()
    for name, layer in layers.items():
        if path == "autocast_bf16":
            error = (layer.coef.grad - expected[name]).norm() / expected[name].norm()
            assert error < 3e-2, (name, float(error))
        else:
            torch.testing.assert_close(layer.coef.grad, expected[name], rtol=1e-4, atol=1e-5)
