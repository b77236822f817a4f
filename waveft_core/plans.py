"""Which kernels evaluate a layer's update on a device, and one plan per layer shape shared by all layers.

Two exact implementations of the same maths: :mod:`waveft_core.sparse_ops` (CSR products and a sampled
product; fastest on CPU, and on CUDA where cuSPARSE has them) and :mod:`waveft_core.portable_ops`
(convolutions, gathers and index-adds: every backend, e.g. Apple's MPS, which has no sparse CSR tensors).
The choice is made per device by running the sparse kernels once on a small problem.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import OrderedDict

import torch

from . import portable_ops, sparse_ops
from .geometry import PatchIndex, patch_index, patch_layout
from .kernel_choice import KERNELS_VARIABLE, clear_choices
from .portable_ops import PortablePlan, build_portable_plan
from .positions import sample_positions
from .sparse_ops import SparsePlan, build_plan

Plan = SparsePlan | PortablePlan
log = logging.getLogger("WaveFT")


@functools.cache
def sparse_kernels_work(device: torch.device) -> bool:
    """Whether ``device`` has working CSR kernels (:func:`waveft_core.sparse_ops.kernels_work`), asked once;
    logs the fallback to the portable kernels."""
    works, reason = sparse_ops.kernels_work(device)
    if not works:
        log.info("sparse CSR kernels unavailable on %s (%s); WaveFT uses its portable kernels there", device, reason)
    return works


FAMILIES = ("sparse", "portable")  # the plan families; ``fused`` (fused_ops) evaluates a layer on either's index
KERNEL_NAMES = (*FAMILIES, "fused")


def family(device: torch.device) -> str:
    """The plan family for ``device``: ``WAVEFT_KERNELS`` if it names one (``sparse`` or ``portable``: tests
    and users pin it), else the sparse kernels where the device runs them right, else the portable ones.
    ``fused`` (and ``auto``) leave the plan family to the device; :mod:`waveft_core.kernel_choice` reads it."""
    forced = os.environ.get(KERNELS_VARIABLE, "").strip().lower()
    if forced and forced != "auto":
        if forced not in KERNEL_NAMES:
            raise ValueError(f"{KERNELS_VARIABLE}={forced!r}: choose one of {', '.join(KERNEL_NAMES)} (or auto)")
        if forced == "sparse" and not sparse_kernels_work(torch.device(device)):
            raise ValueError(f"{KERNELS_VARIABLE}=sparse, but {device} has no working sparse CSR kernels")
        if forced in FAMILIES:
            return forced
    return "sparse" if sparse_kernels_work(torch.device(device)) else "portable"


def build(positions: torch.Tensor, shape: tuple[int, int], wavelet: str, device: torch.device) -> Plan:
    """A new plan for coefficients at flat ``positions`` of an ``(out, in)`` weight, for ``device``'s kernels."""
    device = torch.device(device)
    if family(device) == "sparse":
        return build_plan(positions, tuple(shape), wavelet, device)
    return build_portable_plan(positions, tuple(shape), wavelet, device)


_SHARED_PLANS: OrderedDict[tuple, Plan] = OrderedDict()
SHARED_PLANS_KEPT = 64


def shared_plan(positions: torch.Tensor, shape: tuple[int, int], wavelet: str, device: torch.device) -> Plan:
    """:func:`build`, shared by every layer with the same positions, shape and wavelet on ``device``.

    Layers seeded alike draw identical positions (SDXL's 560 attention projections come in 4 shapes), so one
    plan per shape serves them all: per-layer plans took 390 MB for db1 and 4 GB for db4 across SDXL's
    attention. The most recently used ``SHARED_PLANS_KEPT`` plans are kept.
    """
    device = torch.device(device)
    digest = hashlib.blake2b(positions.detach().cpu().to(torch.int64).numpy().tobytes(), digest_size=16).digest()
    key = (tuple(shape), wavelet, device, family(device), digest)
    if key in _SHARED_PLANS:
        _SHARED_PLANS.move_to_end(key)
    else:
        _SHARED_PLANS[key] = build(positions, tuple(shape), wavelet, device)
        while len(_SHARED_PLANS) > SHARED_PLANS_KEPT:
            _SHARED_PLANS.popitem(last=False)
    return _SHARED_PLANS[key]


def delta_forward(x: torch.Tensor, coef: torch.Tensor, plan: Plan, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``x dW^T`` for ``x`` flattened to ``(T, in)``, computed in float32 and rounded once to ``dtype``."""
    if isinstance(plan, PortablePlan):
        return portable_ops.portable_delta_forward(x, coef, plan, scaling, dtype)
    return sparse_ops.delta_forward(x, coef, plan, scaling, dtype)


def delta_backward(
    grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, plan: Plan, scaling: float, input_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dc`` (float32) and, if ``input_grad``, ``g dW`` in ``x``'s dtype."""
    if isinstance(plan, PortablePlan):
        return portable_ops.portable_delta_backward(grad, x, coef, plan, scaling, input_grad)
    return sparse_ops.delta_backward(grad, x, coef, plan, scaling, input_grad)


def dense_delta(coef: torch.Tensor, plan: Plan, scaling: float) -> torch.Tensor:
    """Dense float32 ``dW = s * S_r^T B S_c`` from the separable factors (the way for long filters)."""
    if isinstance(plan, PortablePlan):
        return portable_ops.portable_dense_delta(coef, plan, scaling)
    return sparse_ops.dense_delta(coef, plan, scaling)


@functools.lru_cache(maxsize=64)
def seeded_patch_index(shape: tuple[int, int], p: int, seed: int, wavelet: str, device: torch.device) -> PatchIndex:
    """The weight-patch index of seeded positions, shared by every layer drawn alike (the 64 most recent)."""
    positions = sample_positions(shape[0], shape[1], p, seed).to(device)
    return patch_index(patch_layout(positions, shape, wavelet), wavelet, device)


def clear_caches(device: torch.device | str | None = None) -> None:
    """Drop the shared kernel plans and patch indices (those on ``device``, or all): what a host calls when it
    unloads a model, so no device memory outlives it. The next use rebuilds them (milliseconds per shape)."""
    target = None if device is None else torch.device(device)
    for key in [k for k in _SHARED_PLANS if target is None or k[2] == target]:
        del _SHARED_PLANS[key]
    seeded_patch_index.cache_clear()  # an lru_cache cannot drop one device's entries
    if target is None:
        clear_choices()
