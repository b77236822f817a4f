"""WaveFT vs LoRA rank 1 through ComfyUI's own patch path, on SDXL's 560 attention layers (real shapes).

A module holding 560 ComfyUI ``Linear`` layers (``comfy.ops``; fp16 by default, as SDXL runs on a GPU) sits
in a ``ModelPatcher``. Each layer gets one patch: the pack's WaveFT adapter (n=2592, db1, seeded positions:
the file format's default) or ComfyUI's ``LoRAAdapter`` rank 1 -- the same number of parameters. Timed,
interleaved, median of ``--repeats`` (wall clock and process CPU time, which other processes disturb less):

* load-time patching: ``ModelPatcher.patch_weight_to_device`` for every weight (float32 copy, the adapter's
  ``calculate_weight``, rounding back, parameter swap), what ComfyUI does when it loads a model;
* low-VRAM patching: ``LowVramPatch`` for every weight, what ComfyUI does on *every forward* when the model
  does not fit (the adapter works on a copy in the weight's own dtype);
* dynamic-VRAM patching (newer ComfyUI): ``memory_required`` + ``prepare`` into a staging buffer (every
  adapter rebuilt from its weights) + the patch, what dynamic VRAM does on every forward;
* the same with a zero-strength patch, i.e. ComfyUI's own overhead around the adapter.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_patch.py [--dtype fp16|fp32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def boot_comfy(path: str):
    """Import ComfyUI (CPU mode) and this pack's adapter glue, as ComfyUI loads the pack."""
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    import importlib
    import importlib.util

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.weight_adapter

    # the repository root imported as a package under an arbitrary name, as ComfyUI does
    spec = importlib.util.spec_from_file_location("waveft_benchmark_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    weight_adapter = importlib.import_module(f"{pack.__name__}.waveft_core.comfy_protocol")
    adapter_class = weight_adapter.register(comfy.weight_adapter.adapters, comfy.weight_adapter.WeightAdapterBase)
    return mm, comfy, adapter_class, importlib.import_module(f"{pack.__name__}.waveft_core")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=2592, help="WaveFT coefficients per layer")
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("skipped: set COMFYUI_PATH to a ComfyUI checkout to compare WaveFT with LoRA through ComfyUI's patch path")
        return
    mm, comfy, adapter_class, core = boot_comfy(comfy_path)

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = list(importlib.import_module(f"{core.__name__}.names").sdxl_attention_shapes().values())
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for out_features, in_features in shapes:
        layer = comfy.ops.disable_weight_init.Linear(in_features, out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02)
        model.layers.append(layer)
    keys = [f"layers.{i}.weight" for i in range(len(shapes))]
    cpu = torch.device("cpu")

    def patcher_with(make) -> object:
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        patcher.add_patches({key: make(shape) for key, shape in zip(keys, shapes, strict=True)}, 1.0)
        return patcher

    def waveft(shape):
        return adapter_class.from_layer(core.LayerAdapter(torch.randn(args.n) * 1e-3, shape, 25.0, "db1", seed=777))

    def lora(shape):
        up, down = torch.randn(shape[0], 1, dtype=dtype) * 1e-2, torch.randn(1, shape[1], dtype=dtype) * 1e-2
        return comfy.weight_adapter.LoRAAdapter(set(), (up, down, 1.0, None, None, None))

    patchers = {"WaveFT n=2592": patcher_with(waveft), "LoRA r1": patcher_with(lora)}
    patchers["no-op (strength 0)"] = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    patchers["no-op (strength 0)"].add_patches({k: waveft(s) for k, s in zip(keys, shapes, strict=True)}, 0.0)

    def load_time(patcher) -> tuple[float, float]:
        start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for key in keys:
                patcher.patch_weight_to_device(key, device_to=cpu)
        elapsed = time.perf_counter() - start[0], time.process_time() - start[1]
        patcher.unpatch_model()  # restore W for the next run
        return elapsed

    def low_vram(patcher) -> tuple[float, float]:
        functions = [comfy.model_patcher.LowVramPatch(key, patcher.patches) for key in keys]
        weights = [layer.weight for layer in model.layers]
        start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for function, weight in zip(functions, weights, strict=True):
                function(weight.to(dtype, copy=True))  # ComfyUI hands the patch a copy (cast_bias_weight)
        return time.perf_counter() - start[0], time.process_time() - start[1]

    def dynamic_vram(patcher) -> tuple[float, float]:
        """What newer ComfyUI's dynamic VRAM does per forward: size, rebuild into a staging buffer, patch."""
        functions = [comfy.model_patcher.LowVramPatch(key, patcher.patches) for key in keys]
        weights = [layer.weight for layer in model.layers]
        start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for function, weight in zip(functions, weights, strict=True):
                function.prepare(torch.empty(function.memory_required(), dtype=torch.uint8), None, copy=True, commit=True)
                function(weight.to(dtype, copy=True))
        return time.perf_counter() - start[0], time.process_time() - start[1]

    measures = [("load-time patch (patch_weight_to_device)", load_time), ("low-VRAM patch, per forward (LowVramPatch)", low_vram)]
    if hasattr(comfy.model_patcher.LowVramPatch, "prepare"):
        measures.append(("dynamic VRAM, per forward (LowVramPatch.prepare + patch)", dynamic_vram))
    print(f"{len(keys)} SDXL attention layers, {sum(o * i for o, i in shapes) / 1e6:.0f} M weights, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, ComfyUI at {comfy_path}")
    for title, measure in measures:
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in patchers}
        for patcher in patchers.values():  # warm-up: positions, patch geometry caches, allocator
            measure(patcher)
        for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
            for name, patcher in patchers.items():
                times[name].append(measure(patcher))
        wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
        cpu_s = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
        print(f"\n{title}: median of {args.repeats}, wall clock | process CPU time")
        for name in patchers:
            print(f"  {name:<20} {wall[name] * 1e3:8.1f} ms {wall[name] / wall['LoRA r1']:5.2f}x LoRA r1"
                  f"  | {cpu_s[name] * 1e3:8.1f} ms {cpu_s[name] / cpu_s['LoRA r1']:5.2f}x LoRA r1")
        for label, table in (("wall", wall), ("CPU", cpu_s)):
            own = {name: table[name] - table["no-op (strength 0)"] for name in ("WaveFT n=2592", "LoRA r1")}
            print(f"  adapter work beyond ComfyUI's own copy/round ({label}): WaveFT {own['WaveFT n=2592'] * 1e3:.1f} ms,"
                  f" LoRA r1 {own['LoRA r1'] * 1e3:.1f} ms")
    mm.soft_empty_cache()


if __name__ == "__main__":
    main()
