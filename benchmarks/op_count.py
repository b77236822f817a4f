"""Kernel launches and host time per adapted Linear, forward + backward (issue: GPU-shaped WaveFT layers).

On a fast GPU a small layer's cost is the kernels it launches and the Python around them, not its FLOPs. This
counts, with a ``TorchDispatchMode`` on tiny tensors (device-independent), the aten ops of one training step
of one layer that launch a kernel (views, ``empty`` and metadata ops are not counted), and times the host side
(median wall time of the step on tiny CPU tensors, where the maths is negligible). Rows: the frozen base,
PEFT LoRA r1, PEFT WaveFT, and this project's ``WaveFTLinear`` per kernel family (``sparse``, ``portable``:
float32 patches the weight, bf16 adds the update from the activations; ``fused``: a few large kernels, see
``waveft_core/fused_ops.py``) and dtype, all measured in this run. ``--device cuda`` counts (and times) on a
GPU, where the fused bf16 layer sums ``g^T x`` into float32 by ``mm(out_dtype=)`` instead of two casts.

    python benchmarks/op_count.py [--repeats 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import waveft_core.plans as plans
from waveft_core import WaveFTLinear

# aten ops that only create views or metadata, or allocate without writing: no kernel launch on a GPU
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "slice", "select", "alias", "detach", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "_to_copy_noop", "lift_fresh", "size", "stride", "is_same_size", "unbind", "split",
    "split_with_sizes", "chunk", "narrow", "_reshape_alias", "numel", "sym_size", "sym_stride", "dim",
}  # fmt: skip
OUT, IN, TOKENS = 64, 48, 16


class KernelCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


DEVICE = torch.device("cpu")


def _base(dtype: torch.dtype) -> torch.nn.Linear:
    layer = torch.nn.Linear(IN, OUT).to(DEVICE, dtype)
    layer.requires_grad_(False)
    return layer


def variants() -> dict[str, tuple[Callable[[], torch.nn.Module], torch.dtype]]:
    def lora() -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        model = torch.nn.Sequential(_base(torch.float32))
        return get_peft_model(model, LoraConfig(r=1, target_modules=["0"]))

    def peft_waveft() -> torch.nn.Module:
        from peft import WaveFTConfig, get_peft_model

        model = torch.nn.Sequential(_base(torch.float32))
        return get_peft_model(model, WaveFTConfig(n_frequency=40, target_modules=["0"]))

    def waveft(dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            layer = WaveFTLinear(_base(dtype), n_frequency=40).to(DEVICE)
            with torch.no_grad():
                layer.coef.normal_()
            return layer

        return build

    return {
        "frozen base": (lambda: _base(torch.float32), torch.float32),
        "frozen base bf16": (lambda: _base(torch.bfloat16), torch.bfloat16),
        "PEFT LoRA r1": (lora, torch.float32),
        "PEFT WaveFT": (peft_waveft, torch.float32),
        "WaveFTLinear fp32": (waveft(torch.float32), torch.float32),
        "WaveFTLinear bf16": (waveft(torch.bfloat16), torch.bfloat16),
    }


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    module(x).float().square().sum().backward()


def measure(build: Callable[[], torch.nn.Module], dtype: torch.dtype, repeats: int) -> tuple[int, Counter, float]:
    module = build()
    x = torch.randn(TOKENS, IN, device=DEVICE, dtype=dtype, requires_grad=True)
    step(module, x)  # warm-up: plans, caches
    with KernelCounter() as counter:
        step(module, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(module, x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(counter.ops.values()), counter.ops, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--ops", action="store_true", help="list the counted aten ops of each row")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    rows = []
    for family in plans.KERNEL_NAMES:
        os.environ[plans.KERNELS_VARIABLE] = family  # each layer built below plans with this family
        plans.clear_caches()
        for name, (build, dtype) in variants().items():
            if family != plans.FAMILIES[0] and not name.startswith("WaveFTLinear"):
                continue
            label = f"{name} ({family})" if name.startswith("WaveFTLinear") else name
            rows.append((label, *measure(build, dtype, args.repeats)))
    os.environ.pop(plans.KERNELS_VARIABLE)
    bases = {label: (k, t) for label, k, o, t in rows if label.startswith("frozen base")}
    base_kernels, base_time = bases["frozen base"]
    lora_kernels, lora_time = next((k, t) for label, k, o, t in rows if label == "PEFT LoRA r1")
    print(f"one adapted Linear {OUT}x{IN}, {TOKENS} tokens, forward + backward, on {DEVICE}; torch {torch.__version__}")
    print(f"{'layer':<32} {'kernels':>8} {'extra':>6} {'extra / LoRA r1':>16} {'host us':>9} {'extra host / LoRA r1':>21}")
    for label, kernels, ops, seconds in rows:
        # each row against the frozen base of its own dtype (a bf16 loss adds casts that are not the layer's)
        own_kernels, own_time = bases["frozen base bf16" if " bf16" in label else "frozen base"]
        extra, extra_time = kernels - own_kernels, seconds - own_time
        ratio = f"{extra / (lora_kernels - base_kernels):.2f}x" if not label.startswith("frozen") else "-"
        time_ratio = f"{extra_time / (lora_time - base_time):.2f}x" if not label.startswith("frozen") else "-"
        print(f"{label:<32} {kernels:>8} {extra:>6} {ratio:>16} {seconds * 1e6:>9.0f} {time_ratio:>21}")
        if args.ops:
            print("    " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))


if __name__ == "__main__":
    main()
