"""reForge and Forge Classic/Neo: WaveFT through their vendored ComfyUI ``weight_adapter`` package.

Both hosts load LoRA files with ComfyUI's ``load_lora``, which asks every class in ``weight_adapter.adapters``
to ``load`` a layer and later calls ``calculate_weight`` on the object it returned (an instance of *their*
``WeightAdapterBase``: reForge ``ldm_patched.modules.weight_adapter``, Neo
``modules_forge.packages.comfy.weight_adapter``). The WaveFT adapter itself is the ComfyUI node pack's; it
is built on the host's base class and put in the host's list by ``nodes.weight_adapter.register(adapters,
base)`` (idempotent), imported lazily so this module loads (and a missing piece is one log line) anywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableSequence
from types import ModuleType

from .layers import log

ADAPTER_MODULE = "nodes.weight_adapter"  # relative to the pack root
Registrar = Callable[[MutableSequence[type], type], type]


def adapter_registrar(package: str) -> Registrar | None:
    """``register(adapters, base)`` of the pack's ComfyUI glue, or ``None`` (after a log line) if unavailable."""
    try:
        module = importlib.import_module(f"{package}.{ADAPTER_MODULE}")
    except Exception as err:  # ImportError, or a module that needs ComfyUI at import time
        log.warning("[WaveFT] %s.%s cannot be imported here (%s: %s)", package, ADAPTER_MODULE, type(err).__name__, err)
        return None
    registrar = getattr(module, "register", None)
    return registrar if callable(registrar) else None


def register(weight_adapter: ModuleType, registrar: Registrar | None, host: str) -> bool:
    """Add the WaveFT adapter class, built on the host's ``WeightAdapterBase``, to its adapter list once."""
    if registrar is None:
        log.error("[WaveFT] %s: no WaveFT weight adapter available; WaveFT files will not apply", host)
        return False
    registrar(weight_adapter.adapters, weight_adapter.WeightAdapterBase)
    log.info("[WaveFT] %s: WaveFT files load through <lora:...> and <waveft:...>", host)
    return True
