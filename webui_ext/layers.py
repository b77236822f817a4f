"""Helpers for WaveFT layers that A1111-family loaders hand over as loose tensors.

Every host here reads a LoRA file itself and passes its tensors around keyed by the kohya prefix; the core's
one validator (:func:`waveft_core.layer_from_tensors`, grouping by
:func:`waveft_core.adapter_file.group_layer_tensors`) turns them into :class:`~waveft_core.LayerAdapter` objects. Validation happens before any
weight is touched and is all-or-nothing per file, so a bad file is refused whole, never applied in part.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch

from ..waveft_core import AdapterFileError, LayerAdapter, layer_from_tensors, names
from ..waveft_core.adapter_file import WAVEFT_PART, group_layer_tensors

log = logging.getLogger("WaveFT")

PATCH_TYPE = "waveft"


def is_waveft_part(part: str) -> bool:
    """True for the tensor names (the part after the prefix) that WaveFT claims, e.g. ``waveft_coef``."""
    return part.startswith(WAVEFT_PART)


def weight_shape_2d(weight_shape: tuple[int, ...] | torch.Size | None) -> tuple[int, int] | None:
    """``(out, in)`` of a Linear weight or a 1x1 convolution; ``None`` for anything WaveFT cannot adapt."""
    if weight_shape is None:
        return None
    shape = tuple(int(v) for v in weight_shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4 and shape[2:] == (1, 1):
        return shape[0], shape[1]
    return None


@functools.lru_cache(maxsize=1)
def sdxl_kohya_shapes() -> dict[str, tuple[int, int]]:
    """kohya prefix -> (out, in) of every Linear of SDXL base (UNet and both text encoders)."""
    return {prefix: shape for prefix, (_, _, shape) in names.sdxl_kohya_table().items()}


def collect_layers(
    state_dict: Mapping[str, torch.Tensor],
    to_load: Mapping[str, object],
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict[object, LayerAdapter], set[str]]:
    """WaveFT layers of ``state_dict`` whose prefix is in ``to_load`` (prefix -> model key), all validated.

    Returns ``({model_key: layer}, consumed file keys)``. Every WaveFT layer in the file is validated, not
    only the matched ones, so a host that loads a file in several passes (UNet, then text encoders) sees a
    bad file refused in the first pass: then nothing is returned and *all* WaveFT keys are consumed (so the
    host does not also report them as unmatched), after one log line naming the key.
    """
    groups = group_layer_tensors(state_dict)
    if not groups:
        return {}, set()
    expected_shapes = expected_shapes or {}
    try:
        layers = {prefix: layer_from_tensors(prefix, group, expected_shapes.get(prefix)) for prefix, group in groups.items()}
    except AdapterFileError as err:
        log.error("[WaveFT] refusing a WaveFT file: %s (none of its WaveFT layers is applied)", err)
        return {}, {f"{prefix}.{part}" for prefix, group in groups.items() for part in group}
    matched = {to_load[prefix]: layer for prefix, layer in layers.items() if prefix in to_load}
    used = {f"{prefix}.{part}" for prefix in layers if prefix in to_load for part in groups[prefix]}
    return matched, used


def add_layer_to_weight(weight: torch.Tensor, layer: LayerAdapter, strength: float, key: object = "") -> torch.Tensor:
    """``weight += strength * dW`` in place for a 2-D (or 1x1 conv) weight; returns ``weight``.

    Called from a host's weight-merge loop, where an exception would abort the whole merge: a shape that
    does not fit (only possible if load-time checks could not see the model) is logged and skipped.
    """
    shape = weight_shape_2d(weight.shape)
    if shape != tuple(layer.shape):
        log.error("[WaveFT] %s: adapter is for a %s weight, the model's is %s; layer skipped", key, layer.shape, tuple(weight.shape))
        return weight
    if strength == 0.0:
        return weight
    target = weight if weight.dim() == 2 else weight.view(shape)
    layer.add_to_(target, float(strength))
    return weight
