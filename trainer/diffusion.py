"""The diffusion-training maths, as pure functions of tensors (no model, no state).

DDPM forward process with SDXL's scaled-linear schedule (``T`` steps)::

    beta_t   = (sqrt(beta_0) + t / (T - 1) * (sqrt(beta_1) - sqrt(beta_0)))^2
    abar_t   = prod_{s <= t} (1 - beta_s)
    x_t      = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    target   = eps                                            (epsilon prediction)
             = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0         (v prediction)
    SNR_t    = abar_t / (1 - abar_t)

Min-SNR-gamma weighting (Hang et al. 2023) multiplies each sample's MSE by ``min(SNR_t, gamma) / SNR_t``
for epsilon prediction and ``min(SNR_t, gamma) / (SNR_t + 1)`` for v prediction.
"""

from __future__ import annotations

import math

import torch


def alphas_cumprod(num_steps: int, beta_start: float, beta_end: float, zero_terminal_snr: bool = False) -> torch.Tensor:
    """``abar_t`` (float64 ``[T]``) of the scaled-linear schedule.

    ``zero_terminal_snr`` rescales it so the last step is pure noise (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1): ``sqrt(abar)`` is shifted so its last value is 0 and
    scaled so its first is unchanged, ``sqrt(abar') = (sqrt(abar) - sqrt(abar_T)) * sqrt(abar_0) /
    (sqrt(abar_0) - sqrt(abar_T))`` -- the schedule NoobAI-XL v-pred and other ``ztsnr`` models were trained with.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    if not zero_terminal_snr:
        return abar
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather-free broadcast of a per-sample ``[B]`` vector against ``[B, C, H, W]``."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` with ``abar`` the per-sample ``abar_t`` ``[B]``."""
    return _per_sample(abar.sqrt(), latents) * latents + _per_sample((1 - abar).sqrt(), latents) * noise


def prediction_target(
    latents: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the denoiser should output: ``eps`` or ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _per_sample(abar.sqrt(), noise) * noise - _per_sample((1 - abar).sqrt(), latents) * latents
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}")


def snr_weights(abar: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (all ones when ``gamma`` is ``None``)."""
    if gamma is None:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def sample_noise(shape: torch.Size | tuple[int, ...], noise_offset: float, gen: torch.Generator) -> torch.Tensor:
    """``eps ~ N(0, I)`` (float32, CPU) plus ``noise_offset * n`` with ``n ~ N(0, 1)`` per sample and channel.

    Drawn on the CPU from ``gen`` so a run gives the same noise on every device.
    """
    noise = torch.randn(shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], *([1] * (len(shape) - 2)), generator=gen)
    return noise


def sample_timesteps(batch: int, timestep_range: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Timesteps drawn uniformly from ``[lo, hi)`` (int64 ``[B]``, CPU)."""
    lo, hi = timestep_range
    return torch.randint(lo, hi, (batch,), generator=gen)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_b w_b * mean_{c,h,w} (pred - target)^2``, computed in float32.

    Shapes must match exactly: broadcasting would silently train on a wrong loss.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"denoise returned shape {tuple(prediction.shape)}, expected {tuple(target.shape)}")
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample)).mean()


def learning_rate(step: int, total: int, base_lr: float, warmup: int, scheduler: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Warm-up: ``lr * (step + 1) / warmup`` for ``step < warmup``. After it, with ``u = (step - warmup) /
    max(1, total - warmup)``: constant ``lr``; linear ``lr * (1 - u)``; cosine ``lr * (1 + cos(pi u)) / 2``.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "constant":
        return base_lr
    if scheduler == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"lr_scheduler must be 'constant', 'linear' or 'cosine'; got {scheduler!r}")
