"""Gradient checkpointing of an ldm/sgm UNet's blocks (the layout ComfyUI and A1111 both run for SDXL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


def block_checkpointing(unet: nn.Module) -> Callable[[bool], None]:
    """``set_gradient_checkpointing(on)`` for :func:`train_waveft` on an ldm/sgm UNet (ComfyUI's, A1111's):
    each of its ``input_blocks``, ``middle_block`` and ``output_blocks`` is recomputed in the backward pass
    instead of keeping its activations; ``on=False`` puts the blocks' own forwards back."""
    blocks = [m for part in ("input_blocks", "output_blocks") for m in getattr(unet, part, [])]
    blocks += [unet.middle_block] if hasattr(unet, "middle_block") else []

    saved: dict[nn.Module, Any] = {}

    def wrap(block: nn.Module) -> None:
        forward = block.forward
        saved[block] = block.__dict__.get("forward")  # an instance-level forward someone else installed

        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(lambda a, k: forward(*a, **k), args, kwargs, use_reentrant=False)

        block.forward = checkpointed

    def hook(enable: bool) -> None:
        for block in blocks:
            if enable:
                wrap(block)
            elif saved.get(block) is not None:
                block.forward = saved.pop(block)
            else:
                saved.pop(block, None)
                block.__dict__.pop("forward", None)

    return hook
