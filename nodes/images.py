"""Training images: aspect buckets at the training resolution, and resize-then-centre-crop onto them.

ComfyUI ``IMAGE`` tensors are ``float [B, H, W, C]`` in ``[0, 1]``. Every image keeps its aspect ratio: it is
assigned the bucket of :func:`trainer.data.bucket_for` (the rule A1111's tab uses too); it is scaled to cover the bucket and centre-cropped. Images of one bucket
are encoded together; the trainer batches within buckets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..trainer.data import bucket_for


def fit_to_bucket(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale an ``[H, W, C]`` image to cover ``size = (h, w)`` and centre-crop it to exactly that size."""
    height, width = image.shape[0], image.shape[1]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    chw = image.permute(2, 0, 1)[None].float()
    if (new_h, new_w) != (height, width):
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    chw = chw[:, :, top : top + target_h, left : left + target_w].clamp(0, 1)
    return chw[0].permute(1, 2, 0)


def bucket_images(batches: Iterable[torch.Tensor], resolution: int) -> dict[tuple[int, int], torch.Tensor]:
    """All images of ``batches`` (each ``[B, H, W, C]``), fitted to their buckets: ``{(h, w): [N, h, w, 3]}``."""
    grouped: dict[tuple[int, int], list[torch.Tensor]] = {}
    for batch in batches:
        if batch.dim() == 3:
            batch = batch[None]
        if batch.dim() != 4 or batch.shape[-1] < 3:
            raise ValueError(f"expected IMAGE tensors [B, H, W, C>=3], got {tuple(batch.shape)}")
        for image in batch[..., :3]:
            size = bucket_for(image.shape[0], image.shape[1], resolution)
            grouped.setdefault(size, []).append(fit_to_bucket(image, size))
    if not grouped:
        raise ValueError("no training images")
    return {size: torch.stack(images) for size, images in sorted(grouped.items())}
