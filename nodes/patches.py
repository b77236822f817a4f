"""Which model weight each adapter layer patches: key maps, shape checks and the report of what did not map.

Host-agnostic: the key maps come from ComfyUI (``comfy.lora.model_lora_keys_unet`` / ``_clip``: kohya, ldm and
some diffusers spellings) and are completed here with the diffusers spellings PEFT writes
(``base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0``), which ComfyUI lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..waveft_core import AdapterFileError, LayerAdapter
from ..waveft_core.names import KOHYA_PREFIX, kohya_name, printable, unet_ldm_to_diffusers

log = logging.getLogger("WaveFT")
UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")

KeyTarget = str | tuple  # a weight key, or (key, offset[, function]) as ComfyUI's key maps may hold


def diffusers_aliases(weight_keys: Iterable[str]) -> dict[str, str]:
    """Extra spellings of SDXL UNet weights: diffusers paths as PEFT / diffusers save them.

    For ``diffusion_model.<ldm path>.weight``: ``<diffusers path>``, ``unet.<...>``, ``base_model.model.<...>``
    and ``lora_unet_<diffusers path with _>``.
    """
    aliases: dict[str, str] = {}
    for key in weight_keys:
        if not (key.startswith(UNET_PREFIX) and key.endswith(".weight")):
            continue
        diffusers = unet_ldm_to_diffusers(key[len(UNET_PREFIX) : -len(".weight")])
        if diffusers is None:
            continue
        for alias in (diffusers, f"unet.{diffusers}", f"base_model.model.{diffusers}"):
            aliases[alias] = key
        aliases[KOHYA_PREFIX["unet"] + diffusers.replace(".", "_")] = key
    return aliases


def unet_key_map(comfy_map: Mapping[str, KeyTarget], weight_keys: Iterable[str]) -> dict[str, KeyTarget]:
    """ComfyUI's UNet key map completed with :func:`diffusers_aliases` (ComfyUI's entries win)."""
    return {**diffusers_aliases(weight_keys), **comfy_map}


def target_shape(target: KeyTarget, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """Shape of the weight (or of its narrowed slice) a key-map entry points at; ``None`` if unknown."""
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    shape = shapes.get(key)
    if shape is None or offset is None:
        return shape
    dim, _, length = offset
    return tuple(length if i == dim else n for i, n in enumerate(shape))


def is_text_encoder_layer(prefix: str) -> bool:
    return prefix.startswith(TEXT_ENCODER_PREFIXES)


@dataclass
class PatchPlan:
    """Where an adapter's layers go: ``unet`` / ``clip`` map key-map targets to layers."""

    unet: dict[KeyTarget, LayerAdapter] = field(default_factory=dict)
    clip: dict[KeyTarget, LayerAdapter] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)  # layers that match no weight of the model
    skipped: list[str] = field(default_factory=list)  # text-encoder layers when no CLIP was given

    def log_report(self, source: str) -> None:
        """Log what was not applied, the way ComfyUI logs "lora key not loaded"."""
        if self.unmapped:
            log.warning("[WaveFT] %s: %d layer(s) match no weight of this model and were not applied: %s",
                        printable(source), len(self.unmapped), printable(", ".join(self.unmapped)))
        if self.skipped:
            log.info("[WaveFT] %s: %d text-encoder layer(s) skipped (no CLIP connected)", printable(source), len(self.skipped))


def plan_patches(
    layers: Mapping[str, LayerAdapter],
    unet_map: Mapping[str, KeyTarget],
    unet_shapes: Mapping[str, tuple[int, ...]],
    clip_map: Mapping[str, KeyTarget] | None = None,
    clip_shapes: Mapping[str, tuple[int, ...]] | None = None,
    source: str = "adapter",
) -> PatchPlan:
    """Assign each layer (file prefix -> layer) to a UNet or CLIP weight; ``clip_map=None`` means no CLIP.

    Raises :class:`AdapterFileError` when a layer's shape differs from its weight's, or when no layer fits
    the model at all: both mean the file was made for another model (family), and a partial or garbled
    patch must not be applied silently.
    """
    plan = PatchPlan()
    mismatched: list[str] = []
    for prefix, layer in layers.items():
        for mapping, shapes, bucket in ((unet_map, unet_shapes, plan.unet), (clip_map, clip_shapes, plan.clip)):
            if mapping is None or prefix not in mapping:
                continue
            target = mapping[prefix]
            shape = target_shape(target, shapes or {})
            if shape is not None and tuple(shape) != tuple(layer.shape):
                mismatched.append(f"{prefix} (file {tuple(layer.shape)}, model {tuple(shape)})")
            bucket[target] = layer
            break
        else:
            if clip_map is None and is_text_encoder_layer(prefix):
                plan.skipped.append(prefix)
            else:
                plan.unmapped.append(prefix)
    if mismatched:
        raise AdapterFileError(
            f"{source}: {len(mismatched)} layer(s) do not fit this model's weights, e.g. {'; '.join(mismatched[:3])}. "
            "Was the adapter trained for another model family?"
        )
    if not plan.unet and not plan.clip and not plan.skipped:
        raise AdapterFileError(
            f"{source}: none of its {len(layers)} layer(s) match a weight of this model "
            f"(e.g. {', '.join(list(layers)[:3])}). Was the adapter trained for another model family?"
        )
    return plan


def text_encoders(clip: Any) -> dict[str, Any]:
    """A ComfyUI CLIP's text encoders by kohya component: SDXL's ``clip_l``/``clip_g`` as ``te1``/``te2``;
    a lone ``clip_l`` (SD1.x) as ``te``, since kohya and A1111 name SD1's encoder ``lora_te_``."""
    model = clip.cond_stage_model
    found = {attr: getattr(model, attr) for attr in ("clip_l", "clip_g") if isinstance(getattr(model, attr, None), nn.Module)}
    if set(found) == {"clip_l"}:
        return {"te": found["clip_l"]}
    return {part: found[attr] for part, attr in (("te1", "clip_l"), ("te2", "clip_g")) if attr in found}


def part_pattern(unet_pattern: str, text_encoder_pattern: str) -> str:
    """One regex over the module names of WaveFT Train's parts (``unet.<name>``, ``te1.transformer.<name>``,
    ``te2.transformer.<name>``, SD1's ``te.transformer.<name>``): the UNet pattern searched in the UNet's names, the text-encoder one (if any)
    in the encoders' (``text_model.encoder.layers.0.self_attn.q_proj``: Hugging Face's and kohya's names).
    A pattern anchored with ``^`` stays anchored at the start of ``<name>``."""

    def within(prefix: str, pattern: str) -> str:
        return rf"^{prefix}\.(?:{pattern[1:]})" if pattern.startswith("^") else rf"^{prefix}\..*?(?:{pattern})"

    alternatives = [within("unet", unet_pattern)]
    if text_encoder_pattern:
        alternatives.append(within(r"te[12]?\.transformer", text_encoder_pattern))
    return "|".join(f"(?:{a})" for a in alternatives)


def part_prefix(name: str) -> str:
    """A part-prefixed module name -> its kohya file prefix (``lora_unet_...``, ``lora_te1_text_model_...``)."""
    part, _, rest = name.partition(".")
    return kohya_name(part, rest if part == "unet" else rest.removeprefix("transformer."))
