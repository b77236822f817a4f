"""WaveFT for SDXL: ComfyUI custom-node pack (this file is ComfyUI's entry point) and A1111 extension.

ComfyUI imports this folder as a package (any folder name). Outside ComfyUI -- tests, the CLI, A1111, which
loads ``scripts/waveft_a1111.py`` instead -- this file must import cleanly, so the nodes load only where
ComfyUI's node API exists.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)

WEB_DIRECTORY = "./web"  # the page side: training seed kept fixed, saved paths shown on the nodes
