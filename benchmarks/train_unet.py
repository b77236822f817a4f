"""Training step on a full-size, random-init SDXL UNet (diffusers): frozen base vs WaveFT vs PEFT LoRA r1 vs
PEFT WaveFT, all 560 attention projections adapted (``to_q/k/v/out.0``, n=2592, db1).

One UNet (10 GB in float32 fits once); each variant is attached in turn and its steps alternate with steps
of the same model with the adapter switched off (the frozen base), so each ratio comes from interleaved
medians. The latents require grad, so every step back-propagates through the whole UNet, as in any block
but the first. Peak memory is the growth over the model's own during one step (CUDA:
``max_memory_allocated``; CPU: peak RSS).

    python benchmarks/train_unet.py [--memory]                        # CPU: 512 px, float32
    python benchmarks/train_unet.py --device cuda --dtype bf16 --resolution 1024 [--memory]   # the GPU setting
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from _common import median_seconds, rss_peak_growth_mb

from waveft_core import WaveFTConfig, attach_waveft, detach_waveft, waveft_layers
from waveft_core.names import SDXL_DIFFUSERS_UNET

warnings.filterwarnings("ignore")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_step(unet: torch.nn.Module, resolution: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=gen).to(device, dtype).requires_grad_(True)
    context = torch.randn(1, 77, 2048, generator=gen).to(device, dtype)
    added = {"text_embeds": torch.randn(1, 1280, generator=gen).to(device, dtype),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).to(device, dtype)}
    target = torch.randn(1, 4, side, side, generator=gen).to(device, torch.float32)
    timestep = torch.tensor([500], device=device)

    def step() -> None:
        out = unet(latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(out.float(), target).backward()
        latents.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def peak_growth_mb(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return rss_peak_growth_mb(step)


def _peft_layers(unet: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def _remove_peft(unet: torch.nn.Module) -> None:
    """Put each PEFT-wrapped layer's base layer back (PEFT's own ``unload`` needs a ``PeftModel``)."""
    for name, module in _peft_layers(unet):
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, module.get_base_layer())


def _enable_peft(unet: torch.nn.Module, enabled: bool) -> None:
    for _, module in _peft_layers(unet):
        module.enable_adapters(enabled)


def _enable_ours(unet: torch.nn.Module, enabled: bool) -> None:
    for layer in waveft_layers(unet).values():
        layer.strength = 1.0 if enabled else 0.0  # strength 0: the wrapper calls the frozen Linear only


class Variant(NamedTuple):
    attach: Callable[[torch.nn.Module], object]
    enable: Callable[[torch.nn.Module, bool], None]
    detach: Callable[[torch.nn.Module], object]


def variants(dtype: torch.dtype) -> dict[str, Variant]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft import WaveFTConfig as PeftWaveFTConfig

    ours = WaveFTConfig(n_frequency=2592, wavelet="db1", target_pattern=r"(to_q|to_k|to_v|to_out\.0)$")
    lora = LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS, init_lora_weights=False)
    peft_waveft = PeftWaveFTConfig(n_frequency=2592, wavelet_family="db1", target_modules=TARGETS, init_weights=False)
    return {
        "waveft": Variant(lambda unet: attach_waveft(unet, ours), _enable_ours, detach_waveft),
        "peft_lora_r1": Variant(lambda unet: inject_adapter_in_model(lora, unet).to(dtype), _enable_peft, _remove_peft),
        "peft_waveft": Variant(
            lambda unet: inject_adapter_in_model(peft_waveft, unet).to(dtype), _enable_peft, _remove_peft
        ),
    }


def measure(step: Callable[[], None], unet: torch.nn.Module, variant: Variant, repeats: int) -> tuple[float, float]:
    """Median step times with the adapter on and off, interleaved so that drift hits both."""
    on, off = [], []
    for flag in (True, False):  # warm-up: plans, caches, allocator
        variant.enable(unet, flag)
        step()
    for _ in range(repeats):
        for flag, times in [(True, on), (False, off)]:
            variant.enable(unet, flag)
            times.append(median_seconds(step, 1, 0))
    return statistics.median(on), statistics.median(off)


def peaks(step: Callable[[], None], unet: torch.nn.Module, variant: Variant) -> tuple[float, float]:
    """Peak memory growth of one step with the adapter on and off (after a warm-up step each)."""
    device = next(unet.parameters()).device
    out = []
    for flag in (True, False):
        variant.enable(unet, flag)
        step()
        out.append(peak_growth_mb(step, device))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of time (CPU: a child does it)")
    args = parser.parse_args()
    if args.memory and args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # large blocks straight from the OS, so the resident set follows live tensors, not allocator caches
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    start = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_DIFFUSERS_UNET).to(device, dtype).requires_grad_(False)
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {args.resolution} px, threads {torch.get_num_threads()};"
          f" UNet built in {time.perf_counter() - start:.0f} s; 560 attention Linears adapted, n=2592, db1")
    step = make_step(unet, args.resolution, device, dtype)
    results = {}
    for name, variant in variants(dtype).items():
        if args.only and name not in args.only:
            continue
        variant.attach(unet)
        if args.memory:
            on, off = peaks(step, unet, variant)
            print(f"  {name:<14} peak +{on:7.0f} MB vs base +{off:7.0f} MB", flush=True)
        else:
            results[name] = on, off = measure(step, unet, variant, args.repeats)
            print(f"  {name:<14} {on * 1e3:9.0f} ms vs base {off * 1e3:9.0f} ms: {on / off:5.3f}x base", flush=True)
        variant.detach(unet)
    if "peft_lora_r1" in results:
        lora = results["peft_lora_r1"][0] / results["peft_lora_r1"][1]
        for name, (on, off) in results.items():
            print(f"  {name:<14} {on / off / lora:5.3f}x LoRA r1 (ratios to the base measured alongside)")


if __name__ == "__main__":
    main()
