"""ComfyUI's model, adapted for WaveFT Train: encode once, prepare the UNet (and text encoders), wrap it for
the engine.

* Images and prompt are encoded once (VAE, text encoders), then ComfyUI is asked to load only the UNet
  (``memory_required=1e20`` evicts everything else from the device).
* Nodes run under ``torch.inference_mode()``: training switches it off, and since a model loaded inside a
  node holds *inference tensors*, which autograd refuses to save for backward, those parameters are
  replaced by ordinary copies with the same values (one tensor at a time, so memory peaks at one layer).
* ComfyUI's EPS / V-prediction UNet, called directly with DDPM inputs ``sqrt(abar) x0 + sqrt(1-abar) eps``
  and integer timesteps, predicts ``eps`` / ``v``: exactly the engine's convention, once the engine uses the
  model's own beta schedule.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import comfy.model_base
import comfy.model_management as mm
import comfy.utils
import torch
import torch.utils.checkpoint
from torch import nn

from ..trainer import TrainingData
from ..trainer.diffusion import alphas_cumprod
from ..waveft_core import WaveFTConfig
from .images import bucket_images
from .patches import text_encoders

log = logging.getLogger("WaveFT")


def encode_dataset(model: Any, clip: Any, vae: Any, images: Sequence[torch.Tensor], prompt: str, resolution: int) -> TrainingData:
    """Latents (scaled) and conditioning of every image, bucketed by aspect ratio; plain (non-inference) tensors."""
    buckets = bucket_images(images, resolution)
    encoded = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    context, extra = encoded[0][0], encoded[0][1]
    pooled = extra.get("pooled_output")
    base = model.model
    samples: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    for (height, width), pixels in buckets.items():
        latents = base.process_latent_in(vae.encode(pixels))
        cond = {"context": context[0], "size": torch.tensor([height, width])}  # pixels, for in-loop conditioning
        if pooled is not None:  # SDXL's size conditioning; encode_adm returns None for models without it
            y = base.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                target_width=width, target_height=height)
            if y is not None:
                cond["y"] = y[0]
        samples += [(latent, cond) for latent in latents]
    with torch.inference_mode(False):  # clones made here are ordinary tensors autograd may use
        latents = [latent.detach().to("cpu", torch.float32).clone() for latent, _ in samples]
        conds = [{k: v.detach().to("cpu").clone() for k, v in cond.items()} for _, cond in samples]
    return TrainingData(latents=latents, conds=conds, instance_prompt=prompt)


def schedule(model: Any) -> dict[str, Any]:
    """``TrainSettings`` fields that make the engine's noise maths the model's own; raises if it cannot."""
    base = model.model
    if base.model_type == comfy.model_base.ModelType.EPS:
        prediction = "epsilon"
    elif base.model_type == comfy.model_base.ModelType.V_PREDICTION:
        prediction = "v_prediction"
    else:
        raise ValueError(f"WaveFT training supports epsilon / v-prediction models (SDXL, SD1.x), not {base.model_type.name}")
    sampling = model.get_model_object("model_sampling")
    start, end, steps = (getattr(sampling, k, None) for k in ("linear_start", "linear_end", "num_timesteps"))
    if None in (start, end, steps):
        raise ValueError(f"WaveFT training needs a discrete DDPM noise schedule, not {type(sampling).__name__}")
    abar = alphas_cumprod(int(steps), float(start), float(end))
    expected = ((1 - abar) / abar).sqrt().float()
    if not torch.allclose(sampling.sigmas.detach().cpu().float(), expected, rtol=1e-3):
        raise ValueError("this model's noise schedule (zero-terminal-SNR or custom betas) is not SDXL's scaled-linear one")
    return {"prediction_type": prediction, "beta_start": float(start), "beta_end": float(end), "num_train_timesteps": int(steps)}


def _replace(module: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        previous = module._parameters[name]
        module._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=previous.requires_grad)
    else:
        module._buffers[name] = value


@contextlib.contextmanager
def training_parts(model: Any, clip: Any | None, config: WaveFTConfig) -> Iterator[tuple[nn.ModuleDict, torch.dtype]]:
    """Load ``model`` (and ``clip``, when its text encoders train too) fully, patches baked in, and yield
    ``(parts, compute dtype)``: ``parts`` holds ``unet`` and the text encoders (``te1``, ``te2``), ready to train.

    Inference-tensor parameters get ordinary copies (kept: same values). The targeted UNet Linears are cast
    to the compute dtype when a manual-cast model stores them otherwise (restored on exit), so that the
    WaveFT layer multiplies by the weight directly.
    """
    mm.load_models_gpu([model] + ([clip.patcher] if clip is not None else []), memory_required=1e20, force_full_load=True)
    base = model.model
    compute = base.manual_cast_dtype or base.get_dtype()
    parts = nn.ModuleDict({"unet": base.diffusion_model, **(text_encoders(clip) if clip is not None else {})})
    stash: list[tuple[nn.Module, str, torch.Tensor]] = []
    with torch.inference_mode(False):
        for name, module in parts.named_modules():
            cast = name.startswith("unet.") and isinstance(module, nn.Linear) and config.targets(name)
            for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None:
                    continue
                is_param = key in module._parameters
                if cast and tensor.is_floating_point() and tensor.dtype != compute:
                    stash.append((module, key, tensor))
                    _replace(module, key, tensor.detach().to(compute, copy=True), is_param)
                elif tensor.is_inference():
                    _replace(module, key, tensor.detach().clone(), is_param)
    try:
        yield parts, compute
    finally:
        for module, key, tensor in stash:
            _replace(module, key, tensor, key in module._parameters)


def require_text_encoder_targets(parts: nn.ModuleDict, config: WaveFTConfig, pattern: str) -> None:
    """Refuse a text-encoder pattern that would train nothing there (rather than silently the UNet only)."""
    if set(parts) == {"unet"}:
        raise ValueError("text_encoder_pattern is set, but this CLIP has no CLIP-L/CLIP-G encoder to train (SDXL, SD1.x)")
    linears = [name for name, module in parts.named_modules() if not name.startswith("unet.") and isinstance(module, nn.Linear)]
    if not any(config.targets(name) for name in linears):
        example = linears[0].split(".", 2)[-1] if linears else "none"
        raise ValueError(
            f"text_encoder_pattern {pattern!r} matches none of the text encoders' {len(linears)} Linear layers "
            f"(their names look like {example!r})"
        )


Conditioning = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]


def in_loop_conditioning(model: Any, clip: Any, prompt: str) -> Conditioning:
    """``cond -> (context, y)`` recomputed by the text encoders at every step (so their WaveFT layers get
    gradients), with SDXL's size conditioning from each batch's bucket size; as ``encode_from_tokens``."""
    tokens = clip.tokenize(prompt)

    def conditioning(cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder = clip.cond_stage_model
        encoder.reset_clip_options()
        if clip.layer_idx is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        with torch.autograd.graph.saved_tensors_hooks(_copy_if_in_graph, _same):
            context, pooled = encoder.encode_token_weights(tokens)[:2]
        batch, (height, width) = cond["size"].shape[0], cond["size"][0].tolist()  # a batch is one bucket
        y = None
        if pooled is not None:
            y = model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                       target_width=width, target_height=height)
        return context.expand(batch, -1, -1), None if y is None else y.expand(batch, -1)

    return conditioning


def _copy_if_in_graph(tensor: torch.Tensor) -> torch.Tensor:
    # ComfyUI's CLIP layers add their residuals in place (``x += attn(norm(x))``), which autograd refuses once
    # the norm has saved ``x``: saving a copy of every activation in the graph (77 tokens: small) makes the
    # encoders trainable as they are, with gradients equal to an out-of-place forward's (checked on
    # ComfyUI's real SDXL CLIP). Frozen weights and their casts are not in the graph and are not copied.
    return tensor.clone() if tensor.requires_grad else tensor


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def make_denoise(
    unet: nn.Module, dtype: torch.dtype, conditioning: Conditioning | None = None
) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """The engine's ``denoise(noisy, timesteps, cond)`` on ComfyUI's UNet (DDPM convention, see module doc),
    with the cached conditioning or, given ``conditioning``, the text encoders' output of this step."""

    def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        context, y = conditioning(cond) if conditioning is not None else (cond["context"], cond.get("y"))
        extra = {"y": y.to(noisy.device, dtype)} if y is not None else {}
        context = context.to(noisy.device, dtype)
        return unet(noisy.to(dtype), timesteps.float(), context=context, transformer_options={}, **extra)

    return denoise


BASE_MODEL_VERSIONS = {"SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SD15": "sd_v1", "SD20": "sd_v2"}


def base_model_version(model: Any) -> str:
    """kohya's ``ss_base_model_version`` of a MODEL (A1111 hides files whose version does not fit)."""
    name = type(model.model.model_config).__name__
    return BASE_MODEL_VERSIONS.get(name, name)
