"""Which A1111-family host is running, and the host module WaveFT hooks into.

Decided at load time from what the host has already imported or can import (never from version strings):

* ``a1111``: AUTOMATIC1111 (1.5+): the builtin Lora extension's ``networks`` has ``module_types``;
* ``forge``: Forge 2.x main: ``backend.patcher.lora`` with ``lora_collection_priority`` and
  ``extra_weight_calculators`` (a LoRA "collection" plus a weight calculator);
* ``forge-neo``: Forge Classic / Neo: ``backend.patcher.lora`` re-exports ComfyUI's ``weight_adapter``;
* ``reforge``: reForge: ``ldm_patched.modules.weight_adapter`` (ComfyUI-style adapter list);
* ``unsupported``: anything else (old Forge 1.x, A1111 < 1.5, Lora extension disabled): one log line.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Host:
    """``kind`` (see the module docstring), the module to hook (``None`` if unsupported), and why."""

    kind: str
    hook: ModuleType | None = None
    reason: str = ""


def _try_import(name: str, importer: Callable[[str], ModuleType]) -> ModuleType | None:
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importer(name)
    except Exception:  # a missing or broken optional host module just means "not this host"
        return None


def detect_host(importer: Callable[[str], ModuleType] = importlib.import_module) -> Host:
    """Inspect the running host; ``importer`` is injectable for tests."""
    if _try_import("modules_forge", importer) is None:
        networks = sys.modules.get("networks")
        if networks is not None and isinstance(getattr(networks, "module_types", None), list):
            return Host("a1111", networks)
        return Host("unsupported", None, "the builtin Lora extension is disabled or older than A1111 1.5 (no networks.module_types)")
    lora = _try_import("backend.patcher.lora", importer)
    if lora is not None:
        adapters = getattr(lora, "weight_adapter", None)
        if adapters is not None and isinstance(getattr(adapters, "adapters", None), list):
            return Host("forge-neo", adapters)
        if isinstance(getattr(lora, "lora_collection_priority", None), list) and isinstance(
            getattr(lora, "extra_weight_calculators", None), dict
        ):
            return Host("forge", lora)
        return Host("unsupported", None, "backend.patcher.lora has neither weight adapters nor collections")
    adapters = _try_import("ldm_patched.modules.weight_adapter", importer)
    if adapters is not None and isinstance(getattr(adapters, "adapters", None), list):
        return Host("reforge", adapters)
    return Host("unsupported", None, "this Forge build has no backend.patcher.lora and no ldm_patched weight adapters")
