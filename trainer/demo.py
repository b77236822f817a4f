"""``python -m trainer demo``: the whole job on an embedded default, offline, in well under a minute on a CPU.

A tiny UNet with SDXL's architecture (diffusers ``UNet2DConditionModel``: SDXL's block layout, two ResNets
per level, ``text_time`` added conditioning; small widths, random weights, nothing downloaded) learns a
synthetic "subject": a few Gaussian blobs in latent space, seen shifted and mirrored, in two aspect buckets,
with one fixed prompt embedding. The demo trains WaveFT on its attention projections, shows the loss
falling, saves the adapter, reloads it with :func:`waveft_core.load_adapter`, merges it into a fresh copy of
the base UNet (``W += dW`` on the mapped layers) and checks that copy reproduces the trained model.

The helpers (:func:`tiny_sdxl_unet`, :func:`diffusers_denoise`, :func:`diffusers_name_to_prefix`,
:func:`synthetic_subject`) are what the tests use too; diffusers is imported only when a UNet is built.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import diffusion as diff
from ._core import core, names
from .data import TrainingData, generator
from .engine import Denoise, train_waveft
from .parallel import Collective
from .plot import encode_png, plot_losses
from .progress import TextProgress
from .settings import DEFAULT_INSTANCE_PROMPT, TrainSettings

TEXT_DIM, POOLED_DIM, TIME_DIM, TOKENS = 64, 32, 8, 8
DEFAULT_OUTPUT = Path("demo_output") / "waveft_demo.safetensors"


def tiny_sdxl_unet(channels: tuple[int, int, int] = (32, 64, 64), seed: int = 0) -> nn.Module:
    """A randomly initialised UNet with SDXL's structure, scaled down (``cross_attention_dim = 64``)."""
    from diffusers import UNet2DConditionModel  # only the demo and the tests need diffusers

    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG: keep the caller's
        torch.manual_seed(seed)
        return _build(UNet2DConditionModel, channels)


def _build(cls: Any, channels: tuple[int, int, int]) -> nn.Module:
    return cls(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=min(channels) // 2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM,
    )


def diffusers_denoise(unet: nn.Module) -> Denoise:
    """``denoise(x, t, cond)`` for a diffusers SDXL UNet; ``cond`` holds ``encoder_hidden_states``,
    ``text_embeds`` (pooled) and ``time_ids``."""

    def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return unet(
            noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    return denoise


def diffusers_name_to_prefix(name: str) -> str:
    """kohya prefix of a diffusers SDXL UNet module: ``lora_unet_`` + its ldm path."""
    ldm = names.unet_diffusers_to_ldm(name)
    if ldm is None:
        raise ValueError(f"{name!r} has no SDXL ldm counterpart")
    return names.kohya_name("unet", ldm)


def _subject(generator: torch.Generator, blobs: int = 5) -> tuple[torch.Tensor, ...]:
    centres = torch.rand(blobs, 2, generator=generator) * 0.6 + 0.2
    widths = torch.rand(blobs, generator=generator) * 0.08 + 0.06
    amplitudes = torch.randn(blobs, 4, generator=generator) * 1.5
    return centres, widths, amplitudes


def _render(
    subject: tuple[torch.Tensor, ...], height: int, width: int, shift: torch.Tensor, flip: bool
) -> torch.Tensor:
    centres, widths, amplitudes = subject
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    latent = torch.zeros(4, height, width)
    for (cy, cx), w, amp in zip(centres + shift, widths, amplitudes, strict=True):
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * w**2))
        latent += amp[:, None, None] * blob
    return latent.flip(-1) if flip else latent


def synthetic_subject(
    n_images: int = 8, sizes: tuple[tuple[int, int], ...] = ((16, 16), (12, 16)), seed: int = 0
) -> TrainingData:
    """``n_images`` latents of one subject (random shifts and mirrors), alternating between ``sizes``,
    with one fixed "prompt" (``encoder_hidden_states``, ``text_embeds``) and per-image SDXL ``time_ids``
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` in pixels (8 per latent cell)."""
    generator = torch.Generator().manual_seed(seed)
    subject = _subject(generator)
    prompt = torch.randn(TOKENS, TEXT_DIM, generator=generator)
    pooled = torch.randn(POOLED_DIM, generator=generator)
    latents, conds = [], []
    for index in range(n_images):
        height, width = sizes[index % len(sizes)]
        shift = (torch.rand(2, generator=generator) - 0.5) * 0.1
        flip = bool(torch.rand((), generator=generator) < 0.5)
        latents.append(_render(subject, height, width, shift, flip))
        size = torch.tensor([8.0 * height, 8.0 * width])
        conds.append({
            "encoder_hidden_states": prompt,
            "text_embeds": pooled,
            "time_ids": torch.cat([size, torch.zeros(2), size]),
        })  # fmt: skip
    return TrainingData(latents, conds, instance_prompt=DEFAULT_INSTANCE_PROMPT)


def demo_settings(steps: int = 120, seed: int = 777, batch_size: int = 2) -> TrainSettings:
    """The paper's recipe scaled to the tiny model: 1024 coefficients per layer (a quarter of a 64x64
    weight), a learning rate of 5e-3 (a random base needs larger steps than a pretrained one), batch 2 x
    accumulation 2 and a short warm-up. ``batch_size`` is per process when several train together."""
    return TrainSettings(
        steps=steps,
        learning_rate=5e-3,
        batch_size=batch_size,
        grad_accum=2,
        warmup_steps=5,
        seed=seed,
        resolution=128,
        base_model_name="tiny-sdxl-random-init",
        waveft=core.WaveFTConfig(n_frequency=1024),
    )


def probe_loss(denoise: Denoise, data: TrainingData, settings: TrainSettings, draws: int = 4) -> float:
    """Loss on every latent at fixed timesteps and noise (the same for every call): a noise-free yardstick."""
    abar = diff.alphas_cumprod(settings.num_train_timesteps, settings.beta_start, settings.beta_end).float()
    total, count = 0.0, 0
    with torch.no_grad():
        for draw in range(draws):
            for bucket, indices in enumerate(data.buckets.values()):
                gen = generator(settings.seed, "probe", draw * len(data.buckets) + bucket)
                latents, cond = data.collate(indices, torch.device("cpu"), torch.float32)
                t = diff.sample_timesteps(len(indices), settings.timestep_range, gen)
                noise = diff.sample_noise(latents.shape, 0.0, gen)
                prediction = denoise(diff.add_noise(latents, noise, abar[t]), t, cond)
                loss = diff.diffusion_loss(prediction, noise, torch.ones(len(indices)))
                total, count = total + float(loss) * len(indices), count + len(indices)
    return total / count


def merged_copy(base: nn.Module, adapter: core.AdapterFile, strength: float = 1.0) -> nn.Module:
    """A copy of ``base`` with every adapter layer merged into its Linear weight (``W += strength dW``)."""
    patched = copy.deepcopy(base)
    by_prefix = {
        diffusers_name_to_prefix(name): module
        for name, module in patched.named_modules()
        if isinstance(module, nn.Linear) and names.unet_diffusers_to_ldm(name) is not None
    }
    missing = sorted(set(adapter.layers) - set(by_prefix))
    if missing:
        raise ValueError(f"adapter layers not found in the model: {missing[:3]}")
    with torch.no_grad():
        for prefix, layer in adapter.layers.items():
            layer.add_to_(by_prefix[prefix].weight, strength)
    return patched


def _averages(losses: list[float]) -> tuple[float, float]:
    window = max(1, len(losses) // 10)
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def check_round_trip(trained: nn.Module, base: nn.Module, path: Path, data: TrainingData) -> tuple[float, float]:
    """Reload ``path``, merge it into a copy of ``base`` and compare with ``trained`` (WaveFT attached) on a
    probe batch: returns ``(max |trained - merged|, max |trained - base|)``."""
    patched = merged_copy(base, core.load_adapter(path)).eval()
    latents, cond = data.collate([0, 2], torch.device("cpu"), torch.float32)
    t = torch.tensor([500, 250])
    with torch.no_grad():
        outputs = [diffusers_denoise(model.eval())(latents, t, cond) for model in (trained, patched, base)]
    return float((outputs[0] - outputs[1]).abs().max()), float((outputs[0] - outputs[2]).abs().max())


def run_demo(
    output: Path = DEFAULT_OUTPUT,
    steps: int = 120,
    seed: int = 777,
    quiet: bool = False,
    batch_size: int = 2,
    distributed: Collective | None = None,
) -> dict[str, Any]:
    """Train, save, reload, merge, compare (module docstring). Returns the numbers it prints.

    With ``distributed`` this is one of several data-parallel processes (``batch_size`` each); only rank 0
    prints, writes and checks the file, the others train and return ``{"result": ...}``."""
    main = distributed is None or distributed.rank == 0
    say = print if main and not quiet else (lambda *a: None)
    started = time.monotonic()
    unet = tiny_sdxl_unet().eval()
    base = copy.deepcopy(unet)
    data, settings = synthetic_subject(), demo_settings(steps, seed, batch_size)
    if distributed is not None:
        say(f"{distributed.world_size} processes x batch {batch_size} (global batch {batch_size * distributed.world_size})")
    say(f"WaveFT demo: tiny SDXL-architecture UNet, {len(data)} synthetic latents in {len(data.buckets)} buckets")
    before = probe_loss(diffusers_denoise(unet), data, settings)
    result = train_waveft(
        unet, diffusers_denoise(unet), data, settings, name_to_prefix=diffusers_name_to_prefix,
        output_path=output, progress=TextProgress() if main and not quiet else None, resume=False,
        keep_attached=True, distributed=distributed,
    )  # fmt: skip
    if not main:
        core.detach_waveft(unet)
        return {"result": result}
    first, last = _averages(result.losses)
    after = probe_loss(diffusers_denoise(unet), data, settings)
    say(f"training loss, mean of the first / last 10% of steps: {first:.4f} -> {last:.4f}")
    say(f"loss on a fixed probe batch (same noise and timesteps):  {before:.4f} -> {after:.4f}")
    mismatch, effect = check_round_trip(unet, base, output, data)
    core.detach_waveft(unet)
    plot_path = output.with_name(output.stem + "_loss.png")
    plot_path.write_bytes(encode_png(plot_losses(result.losses, title="demo subject")))
    params = sum(layer.num_params for layer in result.layers.values())
    say(f"saved {output} ({params} coefficients in {len(result.layers)} layers); loss plot {plot_path}")
    say(f"reloaded and merged into a fresh copy of the base UNet: max |trained - merged| = {mismatch:.2e}"
        f" (the adapter changes the output by up to {effect:.2e})")  # fmt: skip
    if mismatch > 1e-4 * max(1.0, effect):
        raise AssertionError(f"the merged model differs from the trained one by {mismatch}")
    seconds = time.monotonic() - started
    say(f"done in {seconds:.1f} s")
    return {
        "first": first, "last": last, "probe_before": before, "probe_after": after, "max_abs_diff": mismatch,
        "effect": effect, "seconds": seconds, "path": output, "result": result,
    }  # fmt: skip
