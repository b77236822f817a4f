"""Training step (forward + backward) on SDXL-shaped attention blocks: WaveFT vs frozen base vs PEFT.

A block is SDXL's attention pair: self-attention (q, k, v, out at ``dim``) and cross-attention (q, out at
``dim``; k, v from a 77 x 2048 context), with residuals, built from diffusers' ``Attention``. Shapes: dim 640
with 4096 tokens and dim 1280 with 1024 tokens; n = 2592 per layer. The block's input requires grad, as in
any block but the first. Times are medians of interleaved repeats in one process; peak memory is the growth
of the peak RSS during one step, each variant in a fresh subprocess.

    python benchmarks/train_step.py [--wavelets db1 db4] [--repeats 5] [--no-memory]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import warnings

import torch
from _common import median_seconds, rss_peak_growth_mb

from waveft_core import WaveFTConfig, attach_waveft

warnings.filterwarnings("ignore")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROJECTIONS_ONLY = False
SHAPES = [(640, 4096), (1280, 1024)]


class AttentionPair(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn1 = Attention(dim, heads=dim // 64, dim_head=64)
        self.attn2 = Attention(dim, cross_attention_dim=2048, heads=dim // 64, dim_head=64)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if PROJECTIONS_ONLY:  # the eight adapted Linears alone, as in DESIGN.md's peer figures
            a1, a2 = self.attn1, self.attn2
            x = x + a1.to_out[0](a1.to_q(x) + a1.to_k(x) + a1.to_v(x))
            return x + a2.to_out[0](a2.to_q(x) + (a2.to_k(context) + a2.to_v(context)).mean(1, keepdim=True))
        x = x + self.attn1(x)
        return x + self.attn2(x, encoder_hidden_states=context)


def build(variant: str, dim: int, wavelet: str) -> torch.nn.Module:
    torch.manual_seed(0)
    block = AttentionPair(dim).requires_grad_(False)
    if variant == "base":
        return block
    if variant == "waveft":
        attach_waveft(block, WaveFTConfig(n_frequency=2592, wavelet=wavelet, target_pattern=r"(to_q|to_k|to_v|to_out\.0)$"))
        return block
    from peft import LoraConfig, inject_adapter_in_model
    from peft import WaveFTConfig as PeftWaveFTConfig

    if variant == "peft_lora_r1":
        config = LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS, init_lora_weights=False)
    else:
        config = PeftWaveFTConfig(n_frequency=2592, wavelet_family=wavelet, target_modules=TARGETS, init_weights=False)
    return inject_adapter_in_model(config, copy.deepcopy(block))


def make_step(model: torch.nn.Module, dim: int, tokens: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, dim, generator=generator, requires_grad=True)
    context = torch.randn(1, 77, 2048, generator=generator)
    grad = torch.randn(1, tokens, dim, generator=generator)

    def step() -> None:
        model(x, context).backward(grad)

    return step


def peak_memory_mb(variant: str, dim: int, tokens: int, wavelet: str) -> float:
    """Peak RSS growth during one step, in a fresh process whose large allocations go straight to the OS
    (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows live tensors rather than allocator caches."""
    code = (
        "import sys, json; sys.argv=['x']; sys.path.insert(0, 'benchmarks'); import train_step as t;"
        f"t.PROJECTIONS_ONLY = {PROJECTIONS_ONLY};"
        f"print(json.dumps(t._measure_peak({variant!r}, {dim}, {tokens}, {wavelet!r})))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_peak(variant: str, dim: int, tokens: int, wavelet: str) -> float:
    torch.set_num_threads(2)
    step = make_step(build(variant, dim, wavelet), dim, tokens)
    step()  # one-time work (plans, caches) is not a step's peak
    return rss_peak_growth_mb(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wavelets", nargs="+", default=["db1", "db4"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    parser.add_argument("--projections-only", action="store_true", help="skip the attention maths itself")
    args = parser.parse_args()
    global PROJECTIONS_ONLY
    PROJECTIONS_ONLY = args.projections_only
    torch.set_num_threads(args.threads)
    clock = "process CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {clock}")
    for wavelet in args.wavelets:
        for dim, tokens in SHAPES:
            variants = ["base", "peft_lora_r1", "peft_waveft", "waveft"]
            steps = {v: make_step(build(v, dim, wavelet), dim, tokens) for v in variants}
            times = {v: [] for v in variants}
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits all variants alike
                for variant, step in steps.items():
                    times[variant].append(median_seconds(step, 1, 0 if times[variant] else 1, args.cpu_time))
            median = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
            what = "projections only" if PROJECTIONS_ONLY else "attention blocks"
            print(f"\n{wavelet}, dim {dim}, {tokens} tokens, {what} (8 adapted layers, n=2592 each)")
            for variant in variants:
                line = f"  {variant:<14} {median[variant] * 1e3:8.1f} ms  {median[variant] / median['base']:5.2f}x base"
                line += f"  {median[variant] / median['peft_lora_r1']:5.2f}x LoRA r1"
                if not args.no_memory:
                    line += f"  peak +{peak_memory_mb(variant, dim, tokens, wavelet):7.1f} MB"
                print(line)
            print(f"  PEFT WaveFT / this WaveFT: {median['peft_waveft'] / median['waveft']:.2f}x")


if __name__ == "__main__":
    main()
