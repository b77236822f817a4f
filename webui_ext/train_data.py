"""The host-independent half of training in A1111: images -> cached latents + SDXL conditioning.

The trainer engine (``..trainer``) only sees cached latents and conditioning dicts, so the VAE and the text
encoders run once, here, through callables the host glue supplies:

* ``encode_image(pixels [1, 3, H, W] in [0, 1]) -> latents [1, 4, H/8, W/8]`` (A1111:
  ``sd_samplers_common.images_tensor_to_samples``, already scaled by the VAE's factor);
* ``encode_prompt(prompt, width, height) -> {"crossattn": [77, 2048], "vector": [2816]}`` (A1111: the SDXL
  conditioner through ``sd_model.get_learned_conditioning``, with the image size as SDXL's size conditioning).

``make_denoise`` adapts sgm's UNet wrapper (``sd_model.model``: ``forward(x, t, c)`` with ``c["crossattn"]``
and ``c["vector"]``) to the engine's ``denoise(x, t, cond)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..trainer.data import bucket_for

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 8192 * 8192  # a larger "image" in a training folder is refused, not decoded

EncodeImage = Callable[[torch.Tensor], torch.Tensor]
EncodePrompt = Callable[[str, int, int], dict[str, torch.Tensor]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden files and anything not a regular file, such as a FIFO
    that would block the WebUI's queue lock, skipped); raises if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    found = sorted(p for p in root.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}")
    return found


def fit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` of an image's bucket: :func:`trainer.data.bucket_for`, the rule ComfyUI's node uses."""
    bucket_h, bucket_w = bucket_for(height, width, resolution)
    return bucket_w, bucket_h


def load_image(path: str | Path, resolution: int) -> Image.Image:
    """RGB image resized to cover its bucket size and centre-cropped to it (EXIF rotation applied)."""
    if Path(path).stat().st_size == 0:  # gradio 3.41 can hand over an upload before it is written
        raise ValueError(f"{Path(path).name} is empty (an upload still in progress?): wait for it, then Train again")
    with Image.open(path) as opened:
        if opened.width * opened.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{Path(path).name}: {opened.width}x{opened.height} is too large to train on")
        image = ImageOps.exif_transpose(opened).convert("RGB")
    size = fit_size(image.width, image.height, resolution)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """``[1, 3, H, W]`` float32 in ``[0, 1]`` (what A1111's VAE helpers take)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def encode_images(images: Sequence[Image.Image], encode_image: EncodeImage) -> list[torch.Tensor]:
    """One float32 CPU latent ``[4, h, w]`` per image (kept on the CPU: the engine moves batches itself)."""
    latents = []
    with torch.no_grad():
        for image in images:
            latent = encode_image(image_to_tensor(image))
            latents.append(latent[0].detach().to("cpu", torch.float32))
    return latents


def encode_conditions(
    images: Sequence[Image.Image], prompt: str, encode_prompt: EncodePrompt
) -> list[dict[str, torch.Tensor]]:
    """Per-image conditioning (SDXL's size conditioning differs per bucket; one text encode per size)."""
    by_size: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for image in images:
            if image.size not in by_size:
                cond = encode_prompt(prompt, image.width, image.height)
                by_size[image.size] = {k: v.detach().to("cpu", torch.float32) for k, v in cond.items()}
    return [by_size[image.size] for image in images]


def sdxl_prompt_encoder(get_learned_conditioning: Callable, conditioning_class: type) -> EncodePrompt:
    """``encode_prompt`` from A1111's ``sd_model.get_learned_conditioning`` and ``prompt_parser.SdConditioning``."""

    def encode_prompt(prompt: str, width: int, height: int) -> dict[str, torch.Tensor]:
        cond = get_learned_conditioning(conditioning_class([prompt], width=width, height=height))
        if not isinstance(cond, dict) or "crossattn" not in cond or "vector" not in cond:
            raise ValueError("the loaded model is not SDXL (its conditioning has no crossattn/vector)")
        return {"crossattn": cond["crossattn"][0], "vector": cond["vector"][0]}

    return encode_prompt


def make_denoise(unet_wrapper: Callable) -> Callable:
    """The engine's ``denoise(x, t, cond)`` through sgm's ``OpenAIWrapper.forward(x, t, c)``.

    Going through the wrapper (not ``diffusion_model`` directly) keeps the host's forward hooks in play.
    """

    def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_wrapper(noisy, timesteps, cond)

    return denoise
