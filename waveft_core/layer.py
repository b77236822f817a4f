"""``WaveFTLinear``: a frozen ``nn.Linear`` plus a trainable WaveFT update, ``y = base(x) + x dW^T``.

Three exact ways to evaluate it, each with a custom backward that never forms a dense ``dW`` gradient. The
plan family's two:

* weight-side (float32/float64 base weights, no autocast): the forward multiplies by ``W + dW`` -- ``W``
  patched in place by a scatter of ``p`` patches and restored exactly afterwards, far cheaper than touching
  the activations again -- and the backward does the same for ``dL/dx``;
* activation-side (half-precision weights, autocast, or a trainable base): ``base(x)`` plus ``x dW^T`` from
  the separable factors, kept in float32 so a small ``dW`` is not lost to bf16 rounding of ``W + dW``;

there ``dL/dc`` is a sampled product, one dot over the tokens per coefficient, and :mod:`waveft_core.plans`
picks the kernels per device: sparse CSR ones (:mod:`~waveft_core.sparse_ops`) where the device has them,
else convolutions and gathers (:mod:`~waveft_core.portable_ops`, e.g. Apple's MPS). The third is the fused
layer (:mod:`~waveft_core.fused_ops`: ``W + dW`` in a copy, few large kernels, what GPUs want) for a frozen
base; :mod:`~waveft_core.kernel_choice` times it against the plan family once per shape class.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_choice
from ._torch_compat import autocast_dtype, autocast_enabled
from .functional import DEFAULT_SCALING, DEFAULT_WAVELET, add_delta_, delta_weight
from .fused_ops import fused_linear
from .plans import Plan, delta_backward, delta_forward, shared_plan
from .positions import DEFAULT_SEED, check_positions, sample_positions
from .wavelets import check_wavelet


@contextmanager
def _patched_weight(weight: torch.Tensor, coef: torch.Tensor, plan: Plan, scaling: float):
    """Yield ``W + dW`` by patching ``W`` in place and restoring exactly the touched entries afterwards.

    Copying ``W`` would cost a pass over the whole weight per forward and per backward; the patch touches
    only ``p L^2`` entries. Weights that cannot be written (inference tensors, strided views) get a copy.
    """
    base = weight.detach()
    if base.is_inference() or not base.is_contiguous():
        yield add_delta_(base.clone(), coef, torch.empty(0), plan.wavelet, scaling, index=plan.patches)
        return
    flat, touched = base.view(-1), plan.patches.touched
    saved = flat.index_select(0, touched)
    try:
        yield add_delta_(base, coef, touched, plan.wavelet, scaling, index=plan.patches)
    finally:
        flat.index_copy_(0, touched, saved)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _MergedLinearFn(torch.autograd.Function):
    # The weight is kept on ctx, not saved for backward: it is patched and restored in place, which would
    # trip autograd's version check on a saved tensor although its values are back to the original.
    @staticmethod
    def forward(ctx: Any, x, coef, weight, bias, plan: Plan, scaling: float):  # type: ignore[override]
        ctx.save_for_backward(x, coef)
        ctx.weight, ctx.plan, ctx.scaling = weight, plan, scaling
        with _patched_weight(weight, coef, plan, scaling) as merged:
            return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        x, coef = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        grad_x = grad_coef = None
        if ctx.needs_input_grad[1]:  # first, so its temporaries are gone before grad_x is allocated
            grad_coef, _ = delta_backward(_tokens(grad_out), _tokens(x), coef, plan, scaling, input_grad=False)
        if ctx.needs_input_grad[0]:
            with _patched_weight(ctx.weight, coef, plan, scaling) as merged:
                grad_x = grad_out @ merged.to(grad_out.dtype)
        return grad_x, grad_coef, None, None, None, None


class _DeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, coef, plan: Plan, scaling: float, out_dtype: torch.dtype):  # type: ignore[override]
        ctx.save_for_backward(x, coef)
        ctx.plan, ctx.scaling = plan, scaling
        delta = delta_forward(_tokens(x), coef, plan, scaling, out_dtype)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        x, coef = ctx.saved_tensors
        grad_coef, grad_x = delta_backward(
            _tokens(grad_out), _tokens(x), coef, ctx.plan, ctx.scaling, input_grad=ctx.needs_input_grad[0]
        )
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_coef if ctx.needs_input_grad[1] else None, None, None, None


def waveft_delta(
    x: torch.Tensor, coef: torch.Tensor, plan: Plan, scaling: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x dW^T`` (differentiable in ``x`` and ``coef``) without forming ``dW``, as ``out_dtype`` (default
    ``x.dtype``)."""
    return _DeltaFn.apply(x, coef, plan, float(scaling), out_dtype or x.dtype)


# Patching W touches p L^2 scattered entries (save, add, restore: twice a step), the activation side makes a
# few passes over the T x in activations. Measured on SDXL shapes (benchmarks/train_step.py, CPU): patching
# wins while it touches up to about half as many entries as the activations hold, and always for Haar's
# 4 taps per coefficient: db8 at 640 x 4096 tokens is 1.12x base patched against 1.18x activation-side, at
# 1280 x 1024 1.46x patched against 1.33x, and db20 there 2.2x against 1.34x.
PATCH_MAX_FRACTION = 0.5
PATCH_ALWAYS_ENTRIES = 1 << 14
PATCH_MAX_WEIGHT_MULTIPLE = 4


def _patching_is_cheaper(x: torch.Tensor, plan: Plan) -> bool:
    entries = plan.patch_entries
    if entries > PATCH_MAX_WEIGHT_MULTIPLE * plan.layout.geometry.out_features * plan.layout.geometry.in_features:
        return False  # the scatter's index alone would dwarf the weight (coif17: 27 M taps per SDXL layer)
    return entries <= PATCH_ALWAYS_ENTRIES or entries <= PATCH_MAX_FRACTION * x.numel()


def _plan_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coef: torch.Tensor, plan: Plan, scaling: float
) -> torch.Tensor:
    """The plan family's evaluation: the patched weight where that is exact and cheaper, else the update
    added from the activations (module docstring)."""
    merged_ok = (
        weight.dtype in (torch.float32, torch.float64)
        and x.dtype == weight.dtype
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not autocast_enabled(x.device.type)
        and _patching_is_cheaper(x, plan)
    )
    if merged_ok:
        return _MergedLinearFn.apply(x, coef, weight, bias, plan, float(scaling))
    if weight.dtype != x.dtype and x.is_floating_point() and not autocast_enabled(x.device.type):
        # weights stored in another dtype than the layer computes in, cast per call as the host's own
        # manual-cast layers do (ComfyUI's text encoders: fp16 weights, float32 activations)
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    # under autocast the base output is in the autocast dtype: the sum must be too (float32 x would
    # otherwise promote it, and ops outside torch's autocast lists then see mixed dtypes)
    base = F.linear(x, weight, bias)
    return base + waveft_delta(x, coef, plan, scaling, base.dtype)


def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coef: torch.Tensor, plan: Plan, scaling: float) -> torch.Tensor:
    """:func:`~waveft_core.fused_ops.fused_linear` in the dtype ``F.linear`` would compute in here: the
    autocast dtype under autocast (cast as autocast casts, with autocast off inside), else ``x``'s."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return fused_linear(x, weight, bias, coef, plan, scaling)
    with torch.autocast(device_type, enabled=False):
        return fused_linear(x.to(autocast_dtype(device_type)), weight, bias, coef, plan, scaling)


def _fused_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> bool:
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    size = plan.layout.geometry.out_features * plan.layout.geometry.in_features
    return frozen and x.is_floating_point() and weight.is_floating_point() and plan.patch_entries <= PATCH_MAX_WEIGHT_MULTIPLE * size


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coef: torch.Tensor, plan: Plan, scaling: float) -> str:
    """``fused`` or ``plan`` for this call: pinned by ``WAVEFT_KERNELS``, else timed once per shape class."""
    forced = kernel_choice.forced_evaluation()
    if forced is not None:
        return forced
    # a trainable layer is timed forward + backward even in a no-grad pass (the first pass of reentrant
    # checkpointing), so its recomputation inside backward finds the choice made
    training = coef.requires_grad
    dtypes = (x.dtype, weight.dtype, autocast_dtype(x.device.type) if autocast_enabled(x.device.type) else x.dtype)
    tokens = x.numel() // max(x.shape[-1], 1)
    key = kernel_choice.shape_class(x.device, dtypes, tuple(weight.shape), plan.patch_entries, tokens, training)

    def timed(evaluate: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            # own saved-tensor hooks: a surrounding non-reentrant checkpoint must not count the timing runs'
            # tensors (its recomputation finds the choice made, runs none, and a different count is an error)
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), torch.enable_grad() if training else torch.no_grad():
                xs = x.detach().requires_grad_(x.requires_grad and training)
                cs = coef.detach().clone().requires_grad_(training)
                y = evaluate(xs, weight, bias, cs, plan, scaling)
                if training:
                    y.backward(torch.ones_like(y))

        return run

    return kernel_choice.choose(key, x.device, {"plan": timed(_plan_linear), "fused": timed(_fused)})


def waveft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    coef: torch.Tensor,
    plan: Plan,
    scaling: float,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + x dW^T``, by the exact evaluation that is fastest on the device for this
    shape class (:mod:`waveft_core.kernel_choice`); a trainable base always takes the plan family's."""
    if _fused_applies(x, weight, bias, plan) and _kernels(x, weight, bias, coef, plan, scaling) == "fused":
        return _fused(x, weight, bias, coef, plan, scaling)
    return _plan_linear(x, weight, bias, coef, plan, scaling)


class WaveFTLinear(nn.Module):
    """A frozen ``nn.Linear`` with ``p`` trainable wavelet coefficients (``coef``, initialised to zeros).

    ``forward(x) = base(x) + strength * x dW^T`` with ``dW = scaling * IDWT2(C)`` and ``C`` holding ``coef``
    at ``positions`` (default: PEFT's ``sample_positions(out, in, n_frequency, seed)``).
    """

    def __init__(
        self,
        base: nn.Linear,
        n_frequency: int,
        wavelet: str = DEFAULT_WAVELET,
        scaling: float = DEFAULT_SCALING,
        seed: int = DEFAULT_SEED,
        positions: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"WaveFTLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.wavelet = check_wavelet(wavelet)
        self.scaling = float(scaling)
        self.seed = int(seed)
        self.strength = 1.0
        out_features, in_features = base.out_features, base.in_features
        if positions is None:
            positions = sample_positions(out_features, in_features, n_frequency, seed)
        else:
            positions = positions.detach().to(torch.int64).cpu()
            check_positions(positions, out_features, in_features)
        if positions.numel() != n_frequency:
            raise ValueError(f"n_frequency={n_frequency} but {positions.numel()} positions given")
        self.register_buffer("positions", positions)
        self.coef = nn.Parameter(torch.zeros(n_frequency, device=base.weight.device))
        self._plans: dict[torch.device, Plan] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.out_features, self.base.in_features

    def plan(self, device: torch.device) -> Plan:
        if device not in self._plans:
            self._plans[device] = shared_plan(self.positions, self.shape, self.wavelet, device)
        return self._plans[device]

    def delta_weight(self) -> torch.Tensor:
        """Dense float32 ``dW`` (for inspection and tests; training never forms it)."""
        return delta_weight(self.coef.detach(), self.positions.to(self.coef.device), self.shape, self.wavelet, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strength == 0.0:
            return self.base(x)
        plan = self.plan(x.device)
        scale = self.scaling * self.strength
        return waveft_linear(x, self.base.weight, self.base.bias, self.coef, plan, scale)

    def extra_repr(self) -> str:
        return f"n_frequency={self.coef.numel()}, wavelet={self.wavelet}, scaling={self.scaling}, seed={self.seed}"
