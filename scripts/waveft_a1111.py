"""A1111 / Forge / reForge entry point of the WaveFT extension (the hosts auto-load only ``scripts/*.py``).

Script modules and everything they import land in one global ``sys.modules`` shared by all extensions, so
plain names such as ``network``, ``trainer`` or ``nodes`` would collide. This shim therefore loads the
repository root as ONE package under a unique name and imports the glue as ``<PACK_NAME>.webui_ext``; all
imports inside the pack are relative. The root ``__init__.py`` loads ComfyUI nodes only when ComfyUI's API
is importable, so loading it here is harmless. On "Reload UI" the host runs this file again: the pack is
re-used and ``setup()`` re-registers the callbacks the host has just cleared.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_NAME = "waveft_sdxl_ext"
ROOT = Path(__file__).resolve().parent.parent


def load_pack(name: str = PACK_NAME, root: Path = ROOT) -> ModuleType:
    """Import ``root`` as the package ``name`` once (re-used if present); returns the package."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the WaveFT pack from {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a half-initialised package must not be re-used on the next load
        raise
    return module


load_pack()
webui_ext = importlib.import_module(f"{PACK_NAME}.webui_ext")
webui_ext.console_logging()
host = webui_ext.setup()
