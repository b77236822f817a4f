"""WaveFT in ComfyUI's core Train LoRA node: the trainable twin of the WaveFT weight adapter.

The core trainer (``comfy_extras/nodes_train.py``) offers the algorithms of ``comfy.weight_adapter.adapter_maps``
and calls ``create_train(weight, rank=..., alpha=...)`` on every weight of two or more dimensions, convolutions
included. What it keeps of the returned module are its ``nn.Parameter``s, each cast to the LoRA dtype (bf16 by
default) and saved by ``SaveLoRA`` under ``<module>.<parameter name>``. So a layer's parameters carry the
file format's own names (``waveft_coef``, ``waveft_shape``, ...), every integer among them is one that bf16
holds exactly, and the stock loaders read the saved file back like any WaveFT file.

Two ways to run, both the host's: weight mode, ``__call__(W) = W + s IDWT2(C)`` (differentiable in the
coefficients, out of place), and bypass mode, ``h(x) = multiplier * x dW^T`` from the activations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_file import LayerAdapter
from .functional import DEFAULT_SCALING, DEFAULT_WAVELET, with_delta

# the seed of the positions of layers the core trainer creates: exact in bf16, its default LoRA dtype
# (777, the method's default, is not), so the saved file names the positions it was trained with
CORE_TRAINER_SEED = 768


def matrix_view(weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor | None:
    """``weight`` as the ``(out, in)`` matrix a layer adapts (a convolution's ``(out, in * k * k)``), sharing
    its storage; ``None`` if the shapes disagree."""
    if tuple(weight.shape) == tuple(shape):
        return weight
    if weight.dim() > 2 and weight.is_contiguous() and (weight.shape[0], weight[0].numel()) == tuple(shape):
        return weight.view(shape)
    return None


def conv_delta(adapter: Any, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``multiplier * conv(x, dW)`` for a convolution in bypass mode (attributes set by ComfyUI's hook)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[adapter.conv_dim - 1]
    kernel = delta.reshape(adapter.out_channels, adapter.in_channels, *adapter.kernel_size)
    return conv(x, kernel.to(x.dtype), **adapter.kw_dict) * float(adapter.multiplier)


def _exact_in_bf16(values: list[float]) -> bool:
    return torch.equal(torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).to(torch.float64),
                       torch.tensor(values, dtype=torch.float64))


class WaveFTTrainMixin:
    """One layer under training; :func:`make_train_class` puts it on the host's ``WeightAdapterTrainBase``."""

    def __init__(self, layer: LayerAdapter) -> None:
        super().__init__()
        if layer.positions is not None:
            raise ValueError("layers with explicit positions cannot be trained by ComfyUI's core trainer: it "
                             "saves every tensor in its LoRA dtype, which cannot hold positions exactly")
        integers = [*layer.shape, float(layer.seed or 0), *layer.wavelet.encode("ascii")]
        if not _exact_in_bf16(integers):
            raise ValueError(f"a WaveFT layer of shape {layer.shape}, seed {layer.seed} cannot be saved exactly "
                             "in bf16 by ComfyUI's core trainer")
        self.spec = layer  # shape, wavelet, scaling, seed and the patch-geometry cache (not parameters)
        self.waveft_coef = nn.Parameter(layer.coef.detach().to(torch.float32).clone())
        for suffix, tensor in layer.tensors("x").items():
            if suffix != "x.waveft_coef":
                name = suffix.partition(".")[2]
                setattr(self, name, nn.Parameter(tensor.to(torch.float32), requires_grad=False))

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int) -> WaveFTTrainMixin:
        """A zero-initialised layer (an exact no-op until trained) with LoRA's parameter count at ``rank``."""
        out_features, in_features = int(weight.shape[0]), int(weight[0].numel())
        budget = max(1, min(rank * (out_features + in_features), out_features * in_features))
        coef = torch.zeros(budget, device=weight.device)
        return cls(LayerAdapter(coef, (out_features, in_features), DEFAULT_SCALING, DEFAULT_WAVELET, seed=CORE_TRAINER_SEED))

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Weight mode: ``W + s IDWT2(C)`` in ``W``'s dtype, differentiable in the coefficients."""
        matrix = w.reshape(self.spec.shape)
        index = self.spec.patch_index(w.device)
        return with_delta(matrix, self.waveft_coef, index, self.spec.scaling).view(w.shape).to(w.dtype)

    def h(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """Bypass mode: ``multiplier * x dW^T`` from the activations (a convolution: the dense ``dW``)."""
        coef = self.waveft_coef.to(torch.float32)
        if getattr(self, "is_conv", False):
            zeros = torch.zeros(self.spec.shape, device=x.device)
            return conv_delta(self, x, with_delta(zeros, coef, self.spec.patch_index(x.device), self.spec.scaling))
        return self.spec.with_coef(coef).activation_delta(x, float(getattr(self, "multiplier", 1.0)))

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device: torch.device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def make_train_class(train_base: type) -> type:
    """``WaveFTTrain``: :class:`WaveFTTrainMixin` on the host's ``WeightAdapterTrainBase`` (an ``nn.Module``)."""
    return type("WaveFTTrain", (WaveFTTrainMixin, train_base), {"__module__": __name__})


__all__ = ["CORE_TRAINER_SEED", "WaveFTTrainMixin", "conv_delta", "make_train_class", "matrix_view"]
