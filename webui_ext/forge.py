"""Forge 2.x main: WaveFT files through Forge's own LoRA path (``backend/patcher/lora.py``).

Forge asks the first "collection" in ``lora_collection_priority`` that has ``load_lora`` to turn a file's
tensors into patches, and merges a patch ``(type, payload)`` whose type it does not know with
``extra_weight_calculators[type](weight, strength, payload)``. So WaveFT adds a collection in front that
takes the ``waveft_*`` keys and hands the rest to the next collection, plus a ``"waveft"`` calculator.
Forge keeps the backups and restores weights itself (``LoraLoader.refresh``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from ..waveft_core import LayerAdapter
from .layers import PATCH_TYPE, add_layer_to_weight, collect_layers, log, sdxl_kohya_shapes

COLLECTION_NAME = "waveft_forge_collection"


def _next_load_lora(forge_lora: ModuleType) -> Callable:
    """``load_lora`` of the first collection after ours (looked up per call: the list may change)."""
    for collection in forge_lora.lora_collection_priority:
        if getattr(collection, "__name__", "") != COLLECTION_NAME and hasattr(collection, "load_lora"):
            return collection.load_lora
    raise RuntimeError("Forge has no other LoRA collection with load_lora")


def _expected_shapes() -> Mapping[str, tuple[int, int]] | None:
    """SDXL's Linear shapes when an SDXL model is loaded, so a misfit file is refused before merging."""
    shared = sys.modules.get("modules.shared")
    model = getattr(shared, "sd_model", None) if shared is not None else None
    return sdxl_kohya_shapes() if getattr(model, "is_sdxl", False) else None


def make_collection(forge_lora: ModuleType, expected_shapes: Callable = _expected_shapes) -> ModuleType:
    """A collection module whose ``load_lora(lora, to_load)`` claims the WaveFT keys and delegates the rest."""

    def load_lora(lora: Mapping[str, torch.Tensor], to_load: Mapping[str, object]):
        layers, used = collect_layers(lora, to_load, expected_shapes())
        rest = {key: value for key, value in lora.items() if key not in used}
        patches, remaining = _next_load_lora(forge_lora)(rest, to_load)
        patches.update({model_key: (PATCH_TYPE, layer) for model_key, layer in layers.items()})
        return patches, remaining

    collection = ModuleType(COLLECTION_NAME, "WaveFT LoRA collection for Forge")
    collection.load_lora = load_lora
    return collection


def calculate_weight(weight: torch.Tensor, strength: float, layer: LayerAdapter) -> torch.Tensor:
    """Forge's extra weight calculator: ``weight + strength * dW`` (any float dtype, in place)."""
    return add_layer_to_weight(weight, layer, strength, "Forge LoRA merge")


def register(forge_lora: ModuleType) -> None:
    """Put the WaveFT collection first and the calculator in place; idempotent across UI reloads."""
    priority = forge_lora.lora_collection_priority
    priority[:] = [c for c in priority if getattr(c, "__name__", "") != COLLECTION_NAME]
    priority.insert(0, make_collection(forge_lora))
    forge_lora.extra_weight_calculators[PATCH_TYPE] = calculate_weight
    log.info("[WaveFT] Forge: WaveFT files load through <lora:...> and <waveft:...>")
