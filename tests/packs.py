"""Loading this repository the way the hosts do (as one package under any name), and undoing it: the
helpers the glue tests share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_pack(name: str = "waveft_pack_under_test") -> ModuleType:
    """Import the repository root as one package under ``name``, as ComfyUI and the A1111 shim do.

    Subpackages are then ``<name>.nodes``, ``<name>.webui_ext``, ``<name>.waveft_core`` ... (relative
    imports resolve inside the pack, never against other top-level modules).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def restore_modules(saved: dict) -> None:
    """Drop modules imported since ``saved`` under new top-level names (stand-ins, host code, the pack),
    and put back replaced ones. New submodules of libraries already loaded (torch.*) stay: re-importing
    those is not safe."""
    tops = {name.partition(".")[0] for name in saved}
    for name in set(sys.modules) - set(saved):
        if name.partition(".")[0] not in tops:
            del sys.modules[name]
    sys.modules.update(saved)
