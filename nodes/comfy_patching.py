"""ComfyUI plumbing of the loader nodes: register the adapter class and folder, turn layers into patches.

The only path into a model is ComfyUI's own: ``clone()`` then ``add_patches`` with one
:class:`~waveft_core.comfy_protocol.WaveFTAdapterMixin` object per weight, which ComfyUI evaluates lazily when it loads
that weight (or per forward in low-VRAM mode). The incoming model is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import comfy.weight_adapter
import folder_paths

from ..waveft_core import LayerAdapter, clear_caches
from ..waveft_core.comfy_protocol import register
from . import paths
from .adapter_files import is_core_trainer_file, read_adapter
from .patches import PatchPlan, plan_patches, unet_key_map

log = logging.getLogger("WaveFT")
_STATE: dict[str, type] = {}  # module level: V3 node classes are locked while they execute


def setup() -> type:
    """Register the WaveFT adapter with ComfyUI's LoRA loading and the ``waveft`` model folder (idempotent)."""
    adapters = comfy.weight_adapter.adapters
    current = _STATE.get("adapter")
    if current is None or current not in adapters:
        # the core Train LoRA node's algorithms and trainable base exist since 0.3.4x: detected, not versioned
        train_base = getattr(comfy.weight_adapter, "WeightAdapterTrainBase", None)
        algorithms = getattr(comfy.weight_adapter, "adapter_maps", None)
        _STATE["adapter"] = register(adapters, comfy.weight_adapter.WeightAdapterBase, train_base, algorithms)
    paths.register_folder(folder_paths)
    return _STATE["adapter"]


def _shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


class ModelKeys:
    """Key maps and weight shapes of a MODEL and (optionally) a CLIP, as adapter files name them."""

    def __init__(self, model: Any | None, clip: Any | None) -> None:
        self.unet_shapes: dict[str, tuple[int, ...]] = {}
        self.unet_map: dict[str, Any] = {}
        if model is not None:
            self.unet_shapes = _shapes(model.model.state_dict())
            self.unet_map = unet_key_map(comfy.lora.model_lora_keys_unet(model.model, {}), self.unet_shapes)
        self.clip_map: dict[str, Any] | None = None
        self.clip_shapes: dict[str, tuple[int, ...]] = {}
        if clip is not None:
            self.clip_shapes = _shapes(clip.cond_stage_model.state_dict())
            self.clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})

    def shape_of(self, prefix: str) -> tuple[int, ...] | None:
        """Shape of the weight a file prefix names (``None`` if it names none)."""
        for mapping, shapes in ((self.unet_map, self.unet_shapes), (self.clip_map or {}, self.clip_shapes)):
            target = mapping.get(prefix)
            if target is not None:
                return shapes.get(target if isinstance(target, str) else target[0])
        return None

    def plan(self, layers: Mapping[str, LayerAdapter], source: str) -> PatchPlan:
        return plan_patches(layers, self.unet_map, self.unet_shapes, self.clip_map, self.clip_shapes, source)


def apply_layers(
    model: Any,
    clip: Any | None,
    layers: Mapping[str, LayerAdapter],
    strength_model: float,
    strength_clip: float,
    source: str,
    keys: ModelKeys | None = None,
    unmapped: list[str] | tuple[str, ...] = (),
) -> tuple[Any, Any | None]:
    """``(model, clip)`` with the layers patched in at the given strengths (inputs untouched; 0 = same object)."""
    adapter_class = setup()
    keys = keys or ModelKeys(model, clip)
    plan = keys.plan(layers, source)
    plan.unmapped[:0] = list(unmapped)
    plan.log_report(source)
    new_model, new_clip = model, clip
    if model is not None and strength_model != 0 and plan.unet:
        new_model = model.clone()
        new_model.add_patches({k: adapter_class.from_layer(layer) for k, layer in plan.unet.items()}, strength_model)
        release_caches_on_unload(new_model)
    if clip is not None and strength_clip != 0 and plan.clip:
        new_clip = clip.clone()
        new_clip.add_patches({k: adapter_class.from_layer(layer) for k, layer in plan.clip.items()}, strength_clip)
    log.info("[WaveFT] %s: %d UNet and %d text-encoder layer(s) applied", source, len(plan.unet), len(plan.clip))
    return new_model, new_clip


def release_caches_on_unload(patcher: Any) -> None:
    """Drop WaveFT's shared device caches when ComfyUI fully unloads this model (its ``ON_DETACH`` callback)."""
    callbacks = getattr(comfy.patcher_extension, "CallbacksMP", None)
    if callbacks is None or not hasattr(patcher, "add_callback"):
        return

    def released(model_patcher: Any, unpatch_all: bool = True) -> None:
        if unpatch_all:
            clear_caches(model_patcher.load_device)

    patcher.add_callback(callbacks.ON_DETACH, released)


def load_with_comfy(model: Any, clip: Any | None, path: Any, strength_model: float, strength_clip: float) -> tuple[Any, Any | None]:
    """A core-trainer file through ComfyUI's own LoRA loading (its diff entries are ComfyUI's to apply)."""
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
    if new_model is not model and new_model is not None:
        release_caches_on_unload(new_model)
    log.info("[WaveFT] %s: a file of ComfyUI's core trainer, applied by ComfyUI's LoRA loading", Path(path).name)
    return new_model, new_clip


def load_and_apply(
    model: Any, clip: Any | None, name: str, strength_model: float, strength_clip: float
) -> tuple[Any, Any | None]:
    """The loader nodes' work: read adapter ``name`` (v1 or PEFT) and patch ``model`` / ``clip``."""
    if strength_model == 0 and (clip is None or strength_clip == 0):
        return model, clip
    setup()
    path = paths.resolve(folder_paths, name)
    if is_core_trainer_file(path):
        return load_with_comfy(model, clip, path, strength_model, strength_clip)
    keys = ModelKeys(model, clip)
    layers, _, unmapped = read_adapter(path, keys.shape_of)
    return apply_layers(model, clip, layers, strength_model, strength_clip, name, keys, unmapped)
