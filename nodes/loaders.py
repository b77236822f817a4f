"""Loader nodes: apply a WaveFT adapter file (or an in-graph ``WAVEFT`` adapter) to MODEL and CLIP.

Node ids are a saved workflow's identity: never rename them.
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..waveft_core import AdapterFile
from . import paths
from .comfy_patching import apply_layers, load_and_apply

CATEGORY = "WaveFT"
WaveFT = io.Custom("WAVEFT")  # a waveft_core.AdapterFile: trained layers (kohya prefixes) + metadata
STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}  # as the stock LoraLoader


def _file_input() -> io.Combo.Input:
    return io.Combo.Input(
        "adapter_name",
        options=paths.adapter_files(folder_paths) or [paths.NO_ADAPTERS],  # the page shows "undefined" for []
        tooltip="A WaveFT adapter from models/waveft or models/loras (v1 file, or a PEFT adapter_model.safetensors).",
    )


def _strength(name: str, what: str) -> io.Float.Input:
    return io.Float.Input(name, **STRENGTH, tooltip=f"How strongly to modify the {what}. Negative values invert it; 0 leaves it untouched.")


class WaveFTLoader(io.ComfyNode):
    """Apply a WaveFT adapter file to a MODEL and its CLIP (like the stock LoraLoader)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WaveFTLoader",
            display_name="Load WaveFT Adapter",
            category=CATEGORY,
            description="Patch the diffusion model and text encoders with a WaveFT (wavelet fine-tuning) adapter.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the adapter is applied to."),
                io.Clip.Input("clip", tooltip="The text encoders the adapter's text-encoder layers are applied to."),
                _file_input(),
                _strength("strength_model", "diffusion model"),
                _strength("strength_clip", "text encoders"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, clip, adapter_name: str, strength_model: float, strength_clip: float) -> io.NodeOutput:
        return io.NodeOutput(*load_and_apply(model, clip, adapter_name, strength_model, strength_clip))


class WaveFTLoaderModelOnly(io.ComfyNode):
    """Apply a WaveFT adapter file to a MODEL only (text-encoder layers are skipped)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WaveFTLoaderModelOnly",
            display_name="Load WaveFT Adapter (Model Only)",
            category=CATEGORY,
            description="Patch only the diffusion model with a WaveFT adapter.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model the adapter is applied to."), _file_input(),
                    _strength("strength_model", "diffusion model")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, adapter_name: str, strength_model: float) -> io.NodeOutput:
        return io.NodeOutput(load_and_apply(model, None, adapter_name, strength_model, 0.0)[0])


class WaveFTApply(io.ComfyNode):
    """Apply an in-graph ``WAVEFT`` adapter (e.g. fresh from WaveFT Train) to a MODEL, optionally a CLIP."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WaveFTApply",
            display_name="Apply WaveFT Adapter",
            category=CATEGORY,
            description="Patch a model with a WAVEFT adapter from another node, at any strength.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the adapter is applied to."),
                WaveFT.Input("waveft", tooltip="The adapter, e.g. the waveft output of WaveFT Train."),
                _strength("strength_model", "diffusion model"),
                _strength("strength_clip", "text encoders"),
                io.Clip.Input("clip", optional=True, tooltip="Optional: text encoders for the adapter's text-encoder layers."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, waveft: AdapterFile, strength_model: float, strength_clip: float, clip=None) -> io.NodeOutput:
        source = waveft.metadata.get("ss_output_name") or "WAVEFT input"
        return io.NodeOutput(*apply_layers(model, clip, waveft.layers, strength_model, strength_clip, source))
