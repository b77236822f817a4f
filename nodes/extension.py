"""The ``ComfyExtension`` ComfyUI gets from ``comfy_entrypoint``: the pack's node list.

Loading the pack also registers the WaveFT weight adapter (so the stock LoraLoader nodes read WaveFT files)
and the ``models/waveft`` folder; ``ComfyExtension.on_load`` is not called by every ComfyUI version, so this
happens when the node list is built.
"""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import comfy_patching, loaders

log = logging.getLogger("WaveFT")


def _training_nodes() -> list[type[io.ComfyNode]]:
    # The training nodes need the trainer package; if it cannot load, the loaders must still work.
    try:
        from . import training
    except Exception as err:  # ImportError, or an error inside the trainer
        log.error("[WaveFT] training nodes unavailable: %s: %s", type(err).__name__, err)
        return []
    return [training.WaveFTTrain, training.WaveFTSave]


class WaveFTExtension(ComfyExtension):
    """Nodes under the ``WaveFT`` category."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        comfy_patching.setup()
        return [loaders.WaveFTLoader, loaders.WaveFTLoaderModelOnly, loaders.WaveFTApply, *_training_nodes()]
