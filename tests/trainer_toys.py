"""Tiny models and data for the trainer tests: a one-block "transformer denoiser" whose Linear layers carry
SDXL's attention names (``blocks.0.attn1.to_q`` ... ``to_out.0``), so the default target pattern applies.
A step costs a millisecond or two, so the engine tests can train for real.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import TrainingData, TrainSettings
from waveft_core import WaveFTConfig
from waveft_core.names import kohya_name

DIM, CONTEXT, TOKENS = 32, 16, 3


def _cpu_autocasts_fp16() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.1 warns before it raises
            with torch.autocast("cpu", dtype=torch.float16):
                return True
    except RuntimeError:
        return False


# torch 2.1 (what A1111 1.10 ships; the suite may run under a host's torch) autocasts only bf16 on CPU
needs_cpu_fp16 = pytest.mark.skipif(not _cpu_autocasts_fp16(), reason="this torch cannot autocast fp16 on CPU")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and threads that spin-wait for each other make a run on a busy
    2-core machine tens of times slower. Import this fixture into a test module to use it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.1)])  # dropout: exercises the model RNG

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.to_q(x), self.to_k(context), self.to_v(context))
        return self.to_out[1](self.to_out[0](out))


class Block(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm(x), context)
        return x + self.ff(self.norm(x))


class ToyDenoiser(nn.Module):
    """``[B, 4, H, W]`` latents, int timesteps, ``context [B, TOKENS, CONTEXT]`` -> ``[B, 4, H, W]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv_in = nn.Conv2d(4, DIM, 1)
            self.time = nn.Linear(DIM, DIM)
            self.blocks = nn.ModuleList([Block(DIM, CONTEXT)])
            self.conv_out = nn.Conv2d(DIM, 4, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(DIM // 2, device=x.device) / (DIM // 2))
        angles = t.float()[:, None] * freqs[None]
        temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype))
        h = self.conv_in(x) + temb[:, :, None, None]
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, context)
        return self.conv_out(tokens.transpose(1, 2).reshape(b, c, height, width))


def toy_denoise(model: nn.Module):
    def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, timesteps, cond["context"])

    return denoise


def toy_prefix(name: str) -> str:
    return kohya_name("unet", name)


def toy_data(n: int = 6, sizes: tuple[tuple[int, int], ...] = ((8, 8),), seed: int = 0) -> TrainingData:
    """``n`` structured latents (a fixed pattern, shifted) cycling through ``sizes``, one shared context."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randn(4, 16, 16, generator=gen)
    context = torch.randn(TOKENS, CONTEXT, generator=gen)
    latents = []
    for index in range(n):
        height, width = sizes[index % len(sizes)]
        latents.append(pattern.roll(index, dims=-1)[:, :height, :width].clone())
    return TrainingData(latents, {"context": context}, instance_prompt="a photo of zjw toy")


def toy_settings(**overrides) -> TrainSettings:
    """Fast defaults: 8 steps of batch 2 x accumulation 2, 16 coefficients per layer, lr 1e-2."""
    values = dict(
        steps=8, learning_rate=1e-2, batch_size=2, grad_accum=2, waveft=WaveFTConfig(n_frequency=16),
        base_model_name="toy",
    )  # fmt: skip
    values.update(overrides)
    return TrainSettings(**values)
