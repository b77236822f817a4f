"""The GPU-shaped WaveFT linear: few, large kernels, no sparse tensors.

A frozen ``y = x W^T + b`` with a WaveFT update, evaluated as::

    M        = W + s * scatter(taps * c)           one index_add of the p L^2 taps into a copy of W
    y        = x M^T + b                           the layer's own GEMM, on M instead of W
    dL/dx    = g M                                 M rebuilt by the same scatter (never kept between passes)
    dL/dc_k  = s * sum_{a,u} taps[k,a,u] * G[r_{k,a}, c_{k,u}],   G = g^T x   (one GEMM, one gather, one bmm)

``taps`` and the flat tap index come from the layer's :class:`~waveft_core.geometry.PatchIndex`. Per layer
and step this launches 7 kernels beyond the frozen layer's (PEFT LoRA r1: 12) and one extra GEMM (``G``);
there is never more than one weight-sized temporary alive (``M`` in the forward; ``G``, then ``M`` in the
backward).

Precision: ``M`` is ``W + dW`` rounded to the weight's dtype (each tap rounded to it, then added: within one
unit in the last place of a single rounding). In float32 that is the exact update to float32 rounding; in
bf16/fp16 an entry of ``dW`` below half a unit of ``W``'s last place does not move ``M`` (the
activation-side families keep such updates; :mod:`waveft_core.kernel_choice` says which runs where). ``G``
is always summed in float32 (so loss-scaled fp16 gradients cannot overflow it): by ``mm`` writing float32
from half inputs where the device can (CUDA), else from float32 copies of ``g`` and ``x`` (two more kernels).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from .geometry import LayerPlan


def scaled_taps(plan: LayerPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat, s * taps)`` of ``plan``'s patches as ``[p, L^2]`` tensors, cached per scale on the plan."""
    cache: dict[float, torch.Tensor] = plan.__dict__.setdefault("_scaled_taps", {})
    patches = plan.patches
    p = patches.taps.shape[0]
    if scale not in cache:
        if len(cache) >= 8:  # strengths swept by a host: keep a few
            cache.clear()
        cache[scale] = (patches.taps.reshape(p, -1) * scale).contiguous()
    return patches.flat.reshape(p, -1), cache[scale]


@functools.cache
def mm_writes_float32(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for bf16 inputs on ``device_type`` (CUDA on
    torch >= 2.8; not the CPU)."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def merged_weight(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``W + scatter(values)`` as a new tensor in ``values``' dtype (a cast of ``W`` takes the taps in place)."""
    if weight.dtype != values.dtype:
        return weight.to(values.dtype).reshape(-1).index_add_(0, flat.reshape(-1), values.reshape(-1)).view(weight.shape)
    return weight.reshape(-1).index_add(0, flat.reshape(-1), values.reshape(-1)).view(weight.shape)


def tap_gradient(grad: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``dL/dc`` (float32 ``[p]``) from ``g`` (``T x out``) and ``x`` (``T x in``): ``G = g^T x`` gathered at
    the taps and dotted with the scaled taps."""
    if grad.dtype not in (torch.bfloat16, torch.float16):
        products = torch.mm(grad.t(), x)
    elif mm_writes_float32(grad.device.type):
        products = torch.mm(grad.t(), x, out_dtype=torch.float32)
    else:  # sums over the tokens stay float32 (and a loss-scaled fp16 g^T x cannot overflow)
        products = torch.mm(grad.t().float(), x.float())
    gathered = products.reshape(-1)[flat]
    del products
    return torch.bmm(gathered.to(taps.dtype).unsqueeze(1), taps.unsqueeze(2)).view(-1)


class FusedLinearFn(torch.autograd.Function):
    """``F.linear(x, W + dW, b)`` for a frozen ``W``/``b``, computed in ``x``'s dtype (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x, coef, weight, bias, flat, taps):  # type: ignore[override]
        values = (taps * coef.detach().to(taps.dtype)[:, None]).to(x.dtype)
        # only x goes through save_for_backward: weights and plans may be inference tensors (ComfyUI loads
        # them so), which autograd refuses to save; they are frozen and never written here
        ctx.save_for_backward(x)
        ctx.weight, ctx.flat, ctx.taps, ctx.values = weight, flat, taps, values
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, merged_weight(weight, flat, values), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        weight, flat, taps, values = ctx.weight, ctx.flat, ctx.taps, ctx.values
        grad_x = grad_coef = None
        if ctx.needs_input_grad[1]:  # first: G is gone before M is rebuilt
            grad_coef = tap_gradient(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), flat, taps)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ merged_weight(weight, flat, values)
        return grad_x, grad_coef, None, None, None, None


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    coef: torch.Tensor,
    plan: LayerPlan,
    scale: float,
) -> torch.Tensor:
    """``F.linear(x, W + scale * IDWT2(C), b)`` in ``x``'s dtype, differentiable in ``x`` and ``coef``; ``W``
    and ``b`` frozen. Weights stored in another dtype are cast per call (a manual-cast layer's rule), and
    that cast is the copy the taps are added into."""
    flat, taps = scaled_taps(plan, float(scale))
    return FusedLinearFn.apply(x, coef, weight.detach(), None if bias is None else bias.detach(), flat, taps)
