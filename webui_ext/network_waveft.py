"""WaveFT as a network module type of A1111's builtin Lora extension (the shape of its ``network_*.py``).

Imported only on A1111 (1.5+, where ``networks.module_types`` exists), after the builtin Lora extension has
put its ``network`` module in ``sys.modules``. The Lora extension then gives WaveFT files cards, previews,
metadata, hashes, te/unet multipliers and its weight backup/restore; this module only says how to turn one
layer's ``waveft_*`` tensors into ``dW``.

All validation happens in ``__init__`` (while the Lora extension loads the file, before any weight is
touched): an error there makes A1111 skip the whole file with its "loading network" error display.
"""

from __future__ import annotations

import network  # the builtin Lora extension's module (on sys.path / in sys.modules once it has loaded)
import torch
from torch import nn

from ..waveft_core import AdapterFileError, layer_from_tensors
from .layers import is_waveft_part, log, weight_shape_2d


def target_shape(sd_module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of the weight the Lora extension will hand to ``calc_updown`` for this module.

    OpenCLIP's fused attention (SDXL text encoder 2) is an ``nn.MultiheadAttention``: A1111 maps the kohya
    ``q/k/v_proj`` keys to it and passes each ``D x D`` chunk of ``in_proj_weight`` (network.py sets
    ``shape`` from ``out_proj`` for the same reason).
    """
    if isinstance(sd_module, nn.MultiheadAttention):
        return weight_shape_2d(sd_module.out_proj.weight.shape)
    weight = getattr(sd_module, "weight", None)
    return weight_shape_2d(weight.shape) if isinstance(weight, torch.Tensor) else None


def _show_in_ui(message: str) -> None:
    """Also list the error under the generated image (A1111 shows ``model_hijack.comments`` there)."""
    try:
        from modules import sd_hijack

        sd_hijack.model_hijack.comments.append(message)
    except Exception:  # a missing UI hook must not hide the real error being raised
        pass


class ModuleTypeWaveFT(network.ModuleType):
    """Claims every layer that has ``waveft_*`` tensors (no builtin module type claims those names)."""

    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if not any(is_waveft_part(part) for part in weights.w):
            return None
        return NetworkModuleWaveFT(net, weights)


class NetworkModuleWaveFT(network.NetworkModule):
    """One WaveFT layer: ``calc_updown`` returns ``multiplier * dW`` through the host's ``finalize_updown``."""

    def __init__(self, net: network.Network, weights: network.NetworkWeights) -> None:
        prefix = weights.network_key.partition(".")[0]
        try:
            shape = target_shape(weights.sd_module)
            if shape is None:
                raise AdapterFileError(f"{prefix}: targets a {type(weights.sd_module).__name__}; WaveFT adapts Linear layers")
            self.layer = layer_from_tensors(prefix, weights.w, shape)
        except AdapterFileError as err:
            message = f"WaveFT file '{net.name}' not applied: {err}"
            log.error("%s", message)
            _show_in_ui(message)
            raise AdapterFileError(message) from None
        super().__init__(net, weights)

    def calc_updown(self, orig_weight: torch.Tensor):
        # float32 on the weight's device: the host adds it to a float32 copy of the weight, then casts once
        updown = torch.zeros(self.layer.shape, dtype=torch.float32, device=orig_weight.device)
        self.layer.add_to_(updown)
        return self.finalize_updown(updown, orig_weight, orig_weight.shape)
