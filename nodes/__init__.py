"""ComfyUI glue of the WaveFT pack: ``comfy_entrypoint`` (V3 node API) and the weight adapter.

Importing this package needs no ComfyUI (the weight adapter, shared with reForge / Forge Neo, is
:mod:`waveft_core.comfy_protocol`). Everything that imports ``comfy`` / ``comfy_api`` is imported inside
:func:`comfy_entrypoint`, which only ComfyUI calls.
"""

from __future__ import annotations

from typing import Any


async def comfy_entrypoint() -> Any:
    """ComfyUI's entry point: register the adapter class and model folder, return the node extension."""
    from .extension import WaveFTExtension

    return WaveFTExtension()


__all__ = ["comfy_entrypoint"]
