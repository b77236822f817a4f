"""reForge and Forge Classic/Neo: WaveFT through their vendored ComfyUI ``weight_adapter`` package.

Both hosts load LoRA files with ComfyUI's ``load_lora``, which asks every class in ``weight_adapter.adapters``
to ``load`` a layer and later calls ``calculate_weight`` on the object it returned (an instance of *their*
``WeightAdapterBase``: reForge ``ldm_patched.modules.weight_adapter``, Neo
``modules_forge.packages.comfy.weight_adapter``). The WaveFT adapter is the one ComfyUI uses too,
:mod:`waveft_core.comfy_protocol`, built on the host's base class and put in the host's list (idempotently).
"""

from __future__ import annotations

from types import ModuleType

from ..waveft_core.comfy_protocol import register as register_adapter
from .layers import log


def register(weight_adapter: ModuleType, host: str) -> bool:
    """Add the WaveFT adapter class, built on the host's ``WeightAdapterBase``, to its adapter list once."""
    base, adapters = getattr(weight_adapter, "WeightAdapterBase", None), getattr(weight_adapter, "adapters", None)
    if base is None or adapters is None:
        log.error("[WaveFT] %s: its weight_adapter package has no WeightAdapterBase/adapters; WaveFT files will not apply", host)
        return False
    register_adapter(adapters, base)
    log.info("[WaveFT] %s: WaveFT files load through <lora:...> and <waveft:...>", host)
    return True
