"""Host-neutral helpers for WaveFT layers that A1111-family loaders hand over as loose tensors.

Every host here reads a LoRA file itself and passes its tensors around keyed by the kohya prefix; these
helpers turn them into validated :class:`~waveft_core.LayerAdapter` objects. Validation happens before any
weight is touched and is all-or-nothing per file, so a bad file is refused whole, never applied in part.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch

from ..waveft_core import AdapterFileError, LayerAdapter, layer_from_tensors, names

log = logging.getLogger("WaveFT")

WAVEFT_PREFIX = "waveft_"
PATCH_TYPE = "waveft"


def is_waveft_part(part: str) -> bool:
    """True for the tensor names (the part after the prefix) that WaveFT claims, e.g. ``waveft_coef``."""
    return part.startswith(WAVEFT_PREFIX)


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.waveft_coef"`` -> ``("lora_unet_x", "waveft_coef")`` (split at the last dot).

    WaveFT tensor names contain no dot, so the last dot always separates prefix and name; A1111 splits at
    the first dot, which gives the same answer for kohya prefixes (they contain no dot either).
    """
    prefix, _, part = key.rpartition(".")
    return prefix, part


def group_waveft_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The WaveFT tensors of a loaded file, grouped per layer: prefix -> {``waveft_*``: tensor}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix, part = split_key(key)
        if prefix and is_waveft_part(part):
            groups.setdefault(prefix, {})[part] = tensor
    return groups


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


def build_layer(
    prefix: str, tensors: Mapping[str, torch.Tensor], expected_shape: tuple[int, int] | None
) -> LayerAdapter:
    """Validate one layer's tensors (names as in the file) and check it fits the model's weight.

    Raises :class:`AdapterFileError` naming ``prefix`` and the offending tensor. Tensors that are not
    ``waveft_*`` are refused: a host would otherwise read them (``alpha``, ``bias`` ...) and apply them too.
    """
    foreign = sorted(part for part in tensors if not is_waveft_part(part))
    if foreign:
        raise AdapterFileError(f"{prefix}: WaveFT layer also has non-WaveFT tensor(s) {foreign}")
    layer = layer_from_tensors(prefix, tensors)
    if expected_shape is not None and tuple(layer.shape) != tuple(expected_shape):
        raise AdapterFileError(
            f"{prefix}.waveft_shape: adapter is for a {layer.shape[0]}x{layer.shape[1]} weight, "
            f"the model's layer is {expected_shape[0]}x{expected_shape[1]}"
        )
    return layer


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
    groups = group_waveft_tensors(state_dict)
    if not groups:
        return {}, set()
    expected_shapes = expected_shapes or {}
    try:
        layers = {prefix: build_layer(prefix, group, expected_shapes.get(prefix)) for prefix, group in groups.items()}
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
