"""One WaveFT training run on A1111's loaded SDXL model (the logic behind the "WaveFT Train" tab).

The host's pieces come in through :class:`HostPieces` (built from ``modules.*`` by :func:`a1111_pieces`), so
the run itself is testable with stand-ins. The trainer engine attaches WaveFT layers to
``sd_model.model.diffusion_model`` in place and restores the model exactly afterwards; the weights the
Lora extension may have patched for the last image are first put back through the extension's own
restore path, so training never starts from (or leaves behind) a LoRA-modified UNet.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..trainer import (
    UI_DEFAULTS,
    TrainingData,
    TrainResult,
    TrainSettings,
    block_checkpointing,
    state_path,
    train_waveft,
)
from ..waveft_core import WaveFTConfig, names
from .train_data import (
    EncodeImage,
    EncodePrompt,
    encode_conditions,
    encode_images,
    load_image,
    make_denoise,
    sdxl_prompt_encoder,
)

SAFE_NAME = re.compile(r"^[\w][\w .+-]{0,100}$")
PREVIEW_SIZE = 512


@dataclass
class TrainRequest:
    """What the user asked for in the tab (validated by :func:`settings_for` and :func:`output_path`)."""

    name: str
    prompt: str
    image_paths: list[Path]
    budget: int = UI_DEFAULTS["budget"]  # type: ignore[assignment]
    steps: int = UI_DEFAULTS["steps"]  # type: ignore[assignment]
    learning_rate: float = UI_DEFAULTS["learning_rate"]  # type: ignore[assignment]
    wavelet: str = UI_DEFAULTS["wavelet"]  # type: ignore[assignment]
    scaling: float = UI_DEFAULTS["scaling"]  # type: ignore[assignment]
    seed: int = UI_DEFAULTS["seed"]  # type: ignore[assignment]
    resolution: int = UI_DEFAULTS["resolution"]  # type: ignore[assignment]
    resume: bool = False
    gradient_checkpointing: bool = True


@dataclass
class HostPieces:
    """The few host objects a run needs (see :func:`a1111_pieces` for where A1111 keeps them)."""

    sd_model: Any
    state: Any  # modules.shared.state: job counters, textinfo, interrupted
    lora_dir: Path
    encode_image: EncodeImage
    encode_prompt: EncodePrompt
    release_networks: Callable[[], None]
    refresh_networks: Callable[[], None]
    model_name: str = ""
    blockers: list[str] = field(default_factory=list)  # reasons the loaded model cannot be trained here


def output_path(lora_dir: Path, name: str) -> Path:
    """``<lora_dir>/<name>.safetensors``; ``name`` must be a plain file name (no folders, no dots first)."""
    name = name.strip()
    if not SAFE_NAME.match(name) or name.endswith("."):
        raise ValueError(f"adapter name {name!r}: use letters, digits, spaces and . + - _ (no folders)")
    return Path(lora_dir) / f"{name}.safetensors"


NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what A1111's Lora page lists (and shares a preview with)


def refuse_to_overwrite(path: Path, resume: bool) -> None:
    """An adapter of this name is only ever replaced by continuing its own run (its state file beside it), and
    a network of another format under the same name (``foo.pt``) keeps its card image."""
    others = [path.with_suffix(s).name for s in NETWORK_SUFFIXES if s != path.suffix and path.with_suffix(s).exists()]
    if others:
        raise ValueError(f"{', '.join(others)} already uses the name {path.stem!r} (and its card image): choose another name")
    if path.exists() and not resume:
        raise ValueError(f"an adapter named {path.stem!r} already exists: choose another name, or tick "
                         "'Continue a saved run of this name' to train it further")
    if path.exists() and not state_path(path).exists():
        raise ValueError(f"{path.name} has no saved training state beside it to continue: choose another name")


def settings_for(request: TrainRequest, model_name: str) -> TrainSettings:
    """Engine settings: the paper's defaults plus what the tab exposes (invalid values raise ValueError)."""
    waveft = WaveFTConfig(n_frequency=int(request.budget), scaling=float(request.scaling), wavelet=request.wavelet)
    return TrainSettings(
        steps=int(request.steps),
        learning_rate=float(request.learning_rate),
        seed=int(request.seed),
        resolution=int(request.resolution),
        gradient_checkpointing=bool(request.gradient_checkpointing),
        base_model_name=model_name,
        output_name=request.name.strip(),
        save_every=UI_DEFAULTS["save_every"],  # a crash costs at most that many steps (resume continues)
        waveft=waveft,
    )


def unet_prefix(module_name: str) -> str:
    """Module path inside ``diffusion_model`` (ldm names) -> the file's kohya prefix ``lora_unet_...``."""
    return names.kohya_name("unet", module_name)


def save_preview(image: Image.Image, adapter_path: Path) -> Path:
    """``<name>.preview.png`` beside the adapter: the card image A1111's Lora page shows."""
    preview = image.copy()
    preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    path = adapter_path.with_name(adapter_path.stem + ".preview.png")
    preview.save(path)
    return path


def _progress(state: Any) -> Callable[[int, int, float], None]:
    def progress(step: int, total: int, loss: float) -> None:
        state.job_no, state.job_count = step, total  # A1111's progress = job_no / job_count
        state.textinfo = f"WaveFT training: step {step}/{total}, loss {loss:.4f}"

    return progress


def run_training(request: TrainRequest, host: HostPieces) -> TrainResult:
    """Encode the images and the prompt, train, save the adapter and its preview, and rescan the Lora list."""
    if host.blockers:
        raise ValueError("; ".join(host.blockers))
    if not request.image_paths:
        raise ValueError("no training images: upload some or give a folder")
    path = output_path(host.lora_dir, request.name)
    refuse_to_overwrite(path, request.resume)
    settings = settings_for(request, host.model_name)
    host.state.textinfo = f"WaveFT: preparing {len(request.image_paths)} image(s)"
    images = [load_image(p, settings.resolution) for p in request.image_paths]
    latents = encode_images(images, host.encode_image)
    bad = [p.name for p, latent in zip(request.image_paths, latents, strict=True) if not torch.isfinite(latent).all()]
    if bad:
        raise ValueError(f"the VAE gave NaN latents for {', '.join(bad)} (an fp16 SDXL VAE: try --no-half-vae)")
    conds = encode_conditions(images, request.prompt, host.encode_prompt)
    data = TrainingData(latents, conds, instance_prompt=request.prompt)
    host.release_networks()
    host.state.job_count = settings.steps
    # the first step takes longest (kernels, caches, the optimizer's state): say it is running
    host.state.textinfo = f"WaveFT training: step 1/{settings.steps} running (the status updates after each step)"
    unet = host.sd_model.model.diffusion_model
    with torch.enable_grad():
        result = train_waveft(
            unet,
            make_denoise(host.sd_model.model),
            data,
            settings,
            name_to_prefix=unet_prefix,
            output_path=path,
            progress=_progress(host.state),
            should_stop=lambda: bool(host.state.interrupted),
            resume=request.resume,
            set_gradient_checkpointing=block_checkpointing(unet),
        )
    if result.saved_path is not None:
        save_preview(images[0], result.saved_path)
        host.refresh_networks()  # `<lora:name>` works at once; the Lora tab shows the card after its refresh
    return result


def blockers_for(sd_model: Any, lowvram: bool) -> list[str]:
    """Why the loaded model cannot be trained here (empty list: it can)."""
    reasons = []
    if sd_model is None or not getattr(sd_model, "is_sdxl", False):
        reasons.append("load an SDXL checkpoint first (WaveFT training here is for SDXL)")
    if lowvram:
        reasons.append("training needs the whole UNet on the GPU: restart without --medvram/--lowvram")
    if _stores_fp8(sd_model):
        reasons.append(
            "the UNet weights are stored in FP8 (Settings > Optimizations > FP8 weight), which training cannot"
            " multiply by: set it to Disable and reload the checkpoint"
        )
    return reasons


def _stores_fp8(sd_model: Any) -> bool:
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if not isinstance(unet, torch.nn.Module):
        return False
    return any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in unet.parameters())


def release_networks(networks: Any, unet_wrapper: torch.nn.Module) -> None:
    """Forget the last prompt's LoRAs and restore every patched UNet layer through the extension's own path.

    A1111 restores lazily on a layer's next forward, but a WaveFT-wrapped Linear is never called itself.
    """
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in unet_wrapper.modules():
            if getattr(module, "network_layer_name", None) is not None:
                networks.network_apply_weights(module)


def a1111_pieces() -> HostPieces:
    """The run's host pieces from a live A1111 1.10 process."""
    import sys

    from modules import prompt_parser, sd_samplers_common, shared

    sd_model = shared.sd_model
    networks = sys.modules.get("networks")
    checkpoint = getattr(sd_model, "sd_checkpoint_info", None)
    return HostPieces(
        sd_model=sd_model,
        state=shared.state,
        lora_dir=Path(shared.cmd_opts.lora_dir),
        encode_image=lambda pixels: sd_samplers_common.images_tensor_to_samples(pixels, 0, sd_model),
        encode_prompt=lambda *args: sdxl_prompt_encoder(sd_model.get_learned_conditioning, prompt_parser.SdConditioning)(*args),
        release_networks=lambda: release_networks(networks, sd_model.model),
        refresh_networks=lambda: networks.list_available_networks() if networks is not None else None,
        model_name=getattr(checkpoint, "name_for_extra", "") or "",
        blockers=blockers_for(sd_model, bool(getattr(sd_model, "lowvram", False))),  # lowvram.is_enabled
    )
