"""Coefficient positions of WaveFT, identical to PEFT's.

PEFT draws, per layer, ``torch.randperm(out * in, generator=Generator().manual_seed(seed))[:n]`` and keeps
``row = flat // in``, ``col = flat % in``. All layers of one shape share the draw, so it is cached per
(shape, n, seed): SDXL's 560 attention layers have four shapes, hence four permutations instead of 560.
"""

from __future__ import annotations

import functools

import torch

DEFAULT_SEED = 777


@functools.lru_cache(maxsize=256)
def _cached_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # clone: a slice is a view that would keep the whole out*in permutation alive in the cache
    return torch.randperm(out_features * in_features, generator=generator)[:n].clone()


def sample_positions(out_features: int, in_features: int, n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Flat positions ``row * in_features + col`` (int64 ``[n]``) of the ``n`` trainable coefficients.

    Raises ``ValueError`` unless ``0 < n <= out_features * in_features``.
    """
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"weight shape must be positive, got ({out_features}, {in_features})")
    if not 0 < n <= out_features * in_features:
        raise ValueError(f"n must satisfy 0 < n <= out*in = {out_features * in_features}, got {n}")
    return _cached_positions(int(out_features), int(in_features), int(n), int(seed)).clone()


def check_positions(positions: torch.Tensor, out_features: int, in_features: int, what: str = "positions") -> None:
    """Raise ``ValueError`` naming ``what`` if ``positions`` are not distinct flat indices of the weight."""
    if positions.dtype != torch.int64 or positions.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D int64 tensor, got {positions.dtype} of shape {tuple(positions.shape)}")
    numel = out_features * in_features
    if positions.numel() == 0 or positions.numel() > numel:
        raise ValueError(f"{what}: {positions.numel()} positions for a {out_features}x{in_features} weight")
    if int(positions.min()) < 0 or int(positions.max()) >= numel:
        raise ValueError(f"{what}: positions out of range [0, {numel}) for a {out_features}x{in_features} weight")
    if torch.unique(positions).numel() != positions.numel():
        raise ValueError(f"{what}: positions are duplicated")
