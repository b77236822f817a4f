"""Images and prompts to :class:`trainer.TrainingData`: latents and SDXL text embeddings, optionally cached on disk.

Each image goes to its aspect bucket (:func:`trainer.data.bucket_for`), is resized to cover it and centre-
cropped; SDXL's ``time_ids`` record ``(original h, w, crop top, left, bucket h, w)`` in pixels. Latents are the
VAE posterior's mode times its scaling factor. A prompt becomes ``encoder_hidden_states`` ``[77, 2048]`` (the
penultimate layers of CLIP-L and bigG, concatenated, as SDXL was trained) and ``text_embeds`` ``[1280]``
(bigG's projected end token). CLIP-L pads with its end token, bigG with 0, like the hosts.

The disk cache names an entry by a hash of what it depends on: the image's bytes and bucket, or the prompt,
plus a fingerprint of the encoder's weights (names, shapes, types and the first row of every tensor, read
from the file's header and a few bytes each, so a cache hit needs no model loaded). Entries are safetensors,
written atomically; a damaged entry is encoded again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._core import core
from ..data import TrainingData, bucket_for
from .single_file import CLIP_G, CLIP_L, VAE, CheckpointReader, SDXLCheckpoint, load_sdxl
from .tokenizer import END, clip_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def prepare_image(path: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([3, H, W] in [-1, 1], time_ids [6])`` of one image in its aspect bucket."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises for damaged or hostile files
        raise ValueError(f"{path.name} is not a readable image ({type(err).__name__}: {err})") from None
    width, height = image.size
    bucket_h, bucket_w = bucket_for(height, width, resolution)
    scale = max(bucket_h / height, bucket_w / width)
    resized_w, resized_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(bucket_h, bucket_w, 3)
    tensor = pixels.permute(2, 0, 1).float() / 127.5 - 1.0
    time_ids = torch.tensor([height, width, top, left, bucket_h, bucket_w], dtype=torch.float32)
    return tensor, time_ids


def weights_fingerprint(reader: CheckpointReader, prefixes: tuple[str, ...]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(k for k in reader.keys if k.startswith(prefixes)):
        part = reader.handle.get_slice(key)
        shape = part.get_shape()
        digest.update(f"{key}:{part.get_dtype()}:{shape}".encode())
        first = part[0:1] if shape else reader.handle.get_tensor(key)
        digest.update(first.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Encoders:
    """The VAE and text encoders of one checkpoint, loaded on first use; ``calls`` counts the encodings done."""

    path: Path
    device: torch.device
    dtype: torch.dtype
    models: SDXLCheckpoint | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"images": 0, "prompts": 0, "loads": 0})

    def _models(self) -> SDXLCheckpoint:
        if self.models is None:
            self.models = load_sdxl(self.path, ("vae", "text"), self.dtype)
            for model in (self.models.vae, self.models.text_encoder, self.models.text_encoder_2):
                model.to(self.device)  # type: ignore[union-attr]
            self.calls["loads"] += 1
        return self.models

    @torch.no_grad()
    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self._models().vae
        self.calls["images"] += 1
        latent = vae.encode(pixels[None].to(self.device, torch.float32)).latent_dist.mode()  # type: ignore[union-attr]
        return (latent[0] * vae.config.scaling_factor).float().cpu()  # type: ignore[union-attr]

    @torch.no_grad()
    def prompt(self, text: str) -> dict[str, torch.Tensor]:
        models, tokenizer = self._models(), clip_tokenizer()
        self.calls["prompts"] += 1
        ids_l, ids_g = (tokenizer(text, pad)[None].to(self.device) for pad in (END, 0))
        hidden_l = models.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]  # type: ignore[misc]
        out_g = models.text_encoder_2(ids_g, output_hidden_states=True)  # type: ignore[misc]
        hidden = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden[0].float().cpu(), "text_embeds": out_g.text_embeds[0].float().cpu()}

    def release(self) -> None:
        self.models = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class DiskCache:
    """``get(kind, key)`` / ``put(kind, key, tensors)`` under ``folder/kind/key.safetensors``; no folder: off."""

    def __init__(self, folder: Path | None, writable: bool = True) -> None:
        self.folder, self.writable = folder, writable

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None or not (self.folder / kind / f"{key}.safetensors").is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self.folder / kind / f"{key}.safetensors"))
        except Exception:  # a damaged entry is simply encoded again
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None or not self.writable:
            return
        (self.folder / kind).mkdir(parents=True, exist_ok=True)
        core.save_tensors_atomic({k: v.contiguous() for k, v in tensors.items()}, self.folder / kind / f"{key}.safetensors", {})


def _key(*parts: object) -> str:
    return hashlib.blake2b("\n".join(map(str, parts)).encode(), digest_size=16).hexdigest()


def _cached(cache: DiskCache, kind: str, key: str, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    found = cache.get(kind, key)
    if found is None:
        found = make()
        cache.put(kind, key, found)
    return found


def subject_data(
    images: Path, prompt: str, resolution: int, encoders: Encoders, reader: CheckpointReader, cache: DiskCache
) -> TrainingData:
    """The :class:`TrainingData` of one subject (every image, one prompt), through the cache."""
    vae_print = weights_fingerprint(reader, (VAE + "encoder.", VAE + "quant_conv."))
    text_print = weights_fingerprint(reader, (CLIP_L, CLIP_G))
    text = _cached(cache, "text", _key(text_print, prompt), lambda: encoders.prompt(prompt))
    latents, conds = [], []
    for path in list_images(images):
        content = hashlib.sha256(path.read_bytes()).hexdigest()

        def encode(path: Path = path) -> dict[str, torch.Tensor]:
            pixels, time_ids = prepare_image(path, resolution)
            return {"latent": encoders.image(pixels), "time_ids": time_ids}

        entry = _cached(cache, "latents", _key(vae_print, content, resolution), encode)
        latents.append(entry["latent"])
        conds.append({**text, "time_ids": entry["time_ids"]})
    return TrainingData(latents, conds, instance_prompt=prompt)
