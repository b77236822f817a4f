"""Training data (cached latents + per-sample conditioning) and the seeded, bucketed batch order.

The host encodes images with its VAE and prompts with its text encoders; the engine only ever sees the
results, so no encoder has to stay in memory while training.

Batch order is a pure function of ``(seed, micro-batch index)``: epoch ``e`` shuffles each aspect bucket
(latents of one shape) with a generator seeded by ``derive_seed(seed, "order", e)``, cuts it into batches
of ``batch_size`` and shuffles the batches. A resumed run therefore needs only the step count to continue
with exactly the same batches, and nothing depends on torch's global RNG.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, ...]


def derive_seed(seed: int, tag: str, index: int) -> int:
    """A 63-bit seed for stream ``tag``, item ``index`` of a run seeded with ``seed`` (SHA-256 based)."""
    digest = hashlib.sha256(f"{seed}:{tag}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, tag: str, index: int) -> torch.Generator:
    """A fresh CPU generator for one item of one random stream (see :func:`derive_seed`)."""
    return torch.Generator().manual_seed(derive_seed(seed, tag, index))


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, copied if it was made under ``torch.inference_mode`` (autograd cannot save those)."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


def group_by_shape(shapes: Sequence[Shape]) -> dict[Shape, list[int]]:
    """Aspect buckets: sample indices grouped by latent shape (shapes sorted, indices ascending)."""
    buckets: dict[Shape, list[int]] = {}
    for index, shape in enumerate(shapes):
        buckets.setdefault(tuple(shape), []).append(index)
    return dict(sorted(buckets.items()))


def epoch_batches(buckets: Mapping[Shape, list[int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch: every sample exactly once, each batch from a single bucket, order drawn from ``gen``."""
    batches: list[list[int]] = []
    for indices in buckets.values():
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def batches_per_epoch(buckets: Mapping[Shape, list[int]], batch_size: int) -> int:
    return sum(-(-len(indices) // batch_size) for indices in buckets.values())


@dataclass(eq=False)
class TrainingData:
    """Cached latents and their conditioning, built by the host.

    * ``latents``: one ``[C, H, W]`` tensor per sample (or a single ``[N, C, H, W]`` tensor), already scaled
      by the VAE's scaling factor. Samples of different ``H, W`` train in separate batches (aspect buckets).
    * ``conds``: per-sample conditioning, ``{name: tensor without batch dimension}`` -- e.g. SDXL's
      ``encoder_hidden_states [77, 2048]``, ``text_embeds [1280]``, ``time_ids [6]`` -- or one dict shared by
      every sample. The engine stacks them into a batch and hands the dict to ``denoise`` unchanged.
    * ``instance_prompt`` and ``num_images`` (defaults to the number of latents) go into the file's metadata.
    """

    latents: Sequence[torch.Tensor] | torch.Tensor
    conds: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]
    instance_prompt: str = ""
    num_images: int | None = None
    _buckets: dict[Shape, list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.latents, torch.Tensor):
            if self.latents.dim() != 4:
                raise ValueError(f"latents tensor must be [N, C, H, W]; got shape {tuple(self.latents.shape)}")
            self.latents = list(self.latents.unbind(0))
        self.latents = [plain_tensor(latent) for latent in self.latents]
        if not self.latents:
            raise ValueError("TrainingData needs at least one latent")
        if isinstance(self.conds, Mapping):
            self.conds = [self.conds] * len(self.latents)
        self.conds = [
            {k: plain_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in c.items()} for c in self.conds
        ]
        if len(self.conds) != len(self.latents):
            raise ValueError(f"{len(self.latents)} latents but {len(self.conds)} conditioning dicts")
        self._check_latents()
        self._check_conds()
        if self.num_images is None:
            self.num_images = len(self.latents)
        self._buckets = group_by_shape([tuple(latent.shape) for latent in self.latents])

    def _check_latents(self) -> None:
        channels = self.latents[0].shape[0] if self.latents[0].dim() == 3 else None
        for index, latent in enumerate(self.latents):
            if latent.dim() != 3 or latent.shape[0] != channels or not latent.is_floating_point():
                raise ValueError(
                    f"latents[{index}]: expected a floating [C, H, W] tensor with C={channels}, "
                    f"got {latent.dtype} {tuple(latent.shape)}"
                )
            if not torch.isfinite(latent).all():
                raise ValueError(f"latents[{index}] contains NaN or Inf")

    def _check_conds(self) -> None:
        reference = self.conds[0]
        for index, cond in enumerate(self.conds):
            if set(cond) != set(reference):
                raise ValueError(f"conds[{index}] has keys {sorted(cond)}, conds[0] has {sorted(reference)}")
            for key, value in cond.items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"conds[{index}][{key!r}] must be a tensor, got {type(value).__name__}")
                if value.shape != reference[key].shape:
                    raise ValueError(
                        f"conds[{index}][{key!r}] has shape {tuple(value.shape)}, "
                        f"conds[0] has {tuple(reference[key].shape)}"
                    )

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def buckets(self) -> dict[Shape, list[int]]:
        return self._buckets

    def collate(
        self, indices: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stack samples ``indices`` (one bucket) into ``[B, C, H, W]`` latents and a batched cond dict.

        Latents stay float32 (the noise maths runs in float32); floating conditioning is cast to ``dtype``.
        """
        latents = torch.stack([self.latents[i] for i in indices]).to(device=device, dtype=torch.float32)
        cond: dict[str, Any] = {}
        for key in self.conds[0]:
            stacked = torch.stack([self.conds[i][key] for i in indices]).to(device)
            cond[key] = stacked.to(dtype) if stacked.is_floating_point() else stacked
        return latents, cond

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run checks to be sure it trains on the same data (counts, shapes, checksums)."""
        return {
            "count": len(self.latents),
            "shapes": [list(shape) for shape in self._buckets],
            "latent_sum": f"{float(sum(latent.double().sum() for latent in self.latents)):.8g}",
            "cond_keys": sorted(self.conds[0]),
        }


class BatchSchedule:
    """Micro-batch ``i`` of a run, as a pure function of ``(seed, i)`` (module docstring)."""

    def __init__(self, buckets: Mapping[Shape, list[int]], batch_size: int, seed: int) -> None:
        self.buckets = dict(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = batches_per_epoch(self.buckets, batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = epoch_batches(self.buckets, self.batch_size, generator(self.seed, "order", epoch))
            self._epoch = (epoch, order)
        return self._epoch[1][position]


def bucket_step(resolution: int) -> int:
    """Bucket granularity: 64 px (SDXL's convention: latents are 1/8 of the image and the UNet halves them three
    times) from 256 px up, else 8 px (the VAE's factor), so tiny test resolutions still get several sizes."""
    return 64 if resolution >= 256 else 8


def bucket_for(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` of an image's aspect bucket: its aspect ratio ``a = w / h``, about ``resolution^2``
    pixels, ``w_b = round(sqrt(resolution^2 a) / step) * step`` and ``h_b`` likewise with ``1 / a``. The one
    bucket rule of both hosts' training."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of size {height}x{width}")
    step = bucket_step(resolution)
    aspect = width / height
    bucket_w = max(step, round(math.sqrt(resolution * resolution * aspect) / step) * step)
    bucket_h = max(step, round(math.sqrt(resolution * resolution / aspect) / step) * step)
    return int(bucket_h), int(bucket_w)
