"""Which way a training layer runs on a device: chosen once per (device, dtypes, shape class) by timing.

Two exact evaluations of a frozen layer plus its update compete: ``plan`` (the device's plan family: sparse
CSR kernels where they work, else the portable ones; the weight is patched in place for float32 or the
update added from the activations) and ``fused`` (:mod:`waveft_core.fused_ops`: a few large kernels). Which
is faster depends on the device, the dtype and the shapes -- on a GPU kernel launches dominate small layers,
on a CPU the sparse kernels often win -- so the first call of each class times both on the call's own
inputs (a warm-up, then the median of a few runs of forward + backward) and keeps the fastest, logging one
line. ``WAVEFT_KERNELS`` pins it: ``sparse`` or ``portable`` (the plan family, ``plan`` here) or ``fused``.
Where timing is impossible (inside ``torch.compile`` tracing or CUDA graph capture) the default is ``fused``
off the CPU and ``plan`` on it, the choice before any timing existed.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger("WaveFT")

KERNELS_VARIABLE = "WAVEFT_KERNELS"
EVALUATIONS = ("plan", "fused")
TIMED_RUNS = 3
_CHOSEN: dict[Hashable, str] = {}


def forced_evaluation() -> str | None:
    """``fused`` or ``plan`` when ``WAVEFT_KERNELS`` pins a family, else None (validated by
    :func:`waveft_core.plans.family`, which reads the same variable)."""
    forced = os.environ.get(KERNELS_VARIABLE, "").strip().lower()
    if not forced or forced == "auto":
        return None
    return "fused" if forced == "fused" else "plan"


def shape_class(
    device: torch.device, dtypes: tuple[torch.dtype, ...], shape: tuple[int, int], taps: int, tokens: int, training: bool
) -> tuple:
    """The key a choice is shared under: exact dtypes and weight shape, taps and tokens to a power of two."""
    bucket = 1 << max(0, math.ceil(math.log2(max(tokens, 1))))
    return (str(device), dtypes, tuple(shape), 1 << max(0, math.ceil(math.log2(max(taps, 1)))), bucket, training)


def _synchronize(device: torch.device) -> None:
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync()


def _can_time(device: torch.device) -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _seconds(run: Callable[[], None], device: torch.device) -> float:
    run()  # warm-up: plans, caches, allocator
    _synchronize(device)
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(key: Hashable, device: torch.device, candidates: dict[str, Callable[[], None]]) -> str:
    """The fastest of ``candidates`` (name -> one forward + backward) for ``key``, timed on first use."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    default = "plan" if device.type == "cpu" or "fused" not in candidates else "fused"
    if len(candidates) == 1 or not _can_time(device):
        return next(iter(candidates)) if len(candidates) == 1 else default
    try:
        times = {name: _seconds(run, device) for name, run in candidates.items()}
    except RuntimeError as error:  # e.g. out of memory while timing: keep the default, say why
        log.info("WaveFT could not time its kernels on %s (%s); using %s", device, error, default)
        _CHOSEN[key] = default
        return default
    best = min(times, key=times.__getitem__)
    _CHOSEN[key] = best
    _, dtypes, shape, taps, tokens, _ = key
    timing = ", ".join(f"{name} {seconds * 1e3:.3g} ms" for name, seconds in times.items())
    dtype_names = "/".join(dict.fromkeys(str(d).removeprefix("torch.") for d in dtypes))
    log.info("WaveFT kernels on %s for %s %dx%d (~%d taps, ~%d tokens): %s (%s)", device, dtype_names, *shape, taps, tokens, best, timing)
    return best


def clear_choices() -> None:
    """Forget every timed choice (tests; a host that switches devices need not call it)."""
    _CHOSEN.clear()
