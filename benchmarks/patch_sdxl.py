"""Patching all 560 SDXL attention layers (real shapes, fp32, random weights, n=2592 per layer).

Baseline: a bare copy of those weights. Compared: waveft_core.add_delta_ (in place, sparse scatter),
LoRA rank-1 merge (W += B A), and PEFT's WaveFT get_delta_weight + add (on every 8th layer, scaled up,
because it is ~30x slower), plus the positions each needs. Prints ratios measured in this one run.

    python benchmarks/patch_sdxl.py [--peft-every 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import median_seconds, report

from waveft_core import LayerAdapter
from waveft_core.names import sdxl_attention_shapes
from waveft_core.positions import _cached_positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peft-every", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = list(sdxl_attention_shapes().values())
    weights = [torch.randn(shape) for shape in shapes]
    copies = [torch.empty_like(w) for w in weights]
    print(f"{len(weights)} layers, {sum(w.numel() for w in weights) / 1e6:.0f} M weights, torch threads {torch.get_num_threads()}")

    _cached_positions.cache_clear()
    start = time.perf_counter()
    layers = [LayerAdapter(torch.randn(2592) * 1e-3, shape, 25.0, "db1", seed=777) for shape in shapes]
    for layer in layers:
        layer.flat_positions()
    positions_s = time.perf_counter() - start
    lora = [(torch.randn(s[0], 1), torch.randn(1, s[1])) for s in shapes]

    def bare_copy() -> None:
        for dst, src in zip(copies, weights, strict=True):
            dst.copy_(src)

    def waveft_patch() -> None:
        for layer, weight in zip(layers, copies, strict=True):
            layer.add_to_(weight, 1.0)

    def lora_merge() -> None:
        for (b, a), weight in zip(lora, copies, strict=True):
            weight.addmm_(b, a)

    results = {
        "bare copy of the weights": median_seconds(bare_copy, args.repeats),
        "WaveFT add_delta_ (this project)": median_seconds(waveft_patch, args.repeats),
        "LoRA r1 merge (W += B A)": median_seconds(lora_merge, args.repeats),
    }
    results["WaveFT copy + add_delta_"] = results["bare copy of the weights"] + results["WaveFT add_delta_ (this project)"]
    results.update(peft_costs(shapes, args.peft_every))
    report("Patching 560 SDXL attention layers (fp32, n=2592, db1)", "bare copy of the weights", results)
    print(f"\n  positions for all 560 layers (cached per shape): {positions_s * 1e3:.0f} ms")


def peft_costs(shapes: list[tuple[int, int]], every: int) -> dict[str, float]:
    try:
        from peft.tuners.waveft.config import WaveFTConfig
        from peft.tuners.waveft.layer import WaveFTLinear
    except ImportError:
        print("  (peft not installed: PEFT rows skipped)")
        return {}
    subset = shapes[::every]
    config = WaveFTConfig(n_frequency=2592, scaling=25.0, wavelet_family="db1")
    start = time.perf_counter()
    peft_layers = [WaveFTLinear(torch.nn.Linear(i, o, bias=False), "default", config, n_frequency=2592) for o, i in subset]
    build = (time.perf_counter() - start) * len(shapes) / len(subset)

    def patch() -> None:
        with torch.no_grad():
            for layer in peft_layers:
                layer.base_layer.weight += layer.get_delta_weight("default")

    apply = median_seconds(patch, 1) * len(shapes) / len(subset)
    return {f"PEFT WaveFT get_delta_weight (1/{every}, scaled)": apply,
            f"PEFT WaveFT layer build/positions (1/{every}, scaled)": build}


if __name__ == "__main__":
    main()
