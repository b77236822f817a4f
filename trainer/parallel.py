"""The engine's hook for data-parallel training (one process per device), free of any launcher library.

With ``distributed`` given, :func:`trainer.train_waveft` treats ``settings.batch_size`` as the per-process
batch: micro-batch ``i`` of the run is the *global* batch of ``batch_size * world_size`` samples that a
single process with that batch size would draw (same samples, same noise, same timesteps), and process ``r``
computes the loss of its contiguous share of it. The coefficient gradients (and the loss) are summed across
processes once per optimiser step, so every process applies the same update and the coefficients never
drift apart. Only rank 0 writes files. The headless trainer supplies an implementation over Hugging Face
``accelerate`` (``trainer/headless/distributed.py``); the engine only needs this protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Collective(Protocol):
    """What the engine needs from a process group: who am I, how many are we, and a sum across us."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (same shape, dtype and device)."""
        ...


def shard(count: int, rank: int, world_size: int) -> slice:
    """Rows of a global batch of ``count`` samples that process ``rank`` computes: contiguous, sizes differing
    by at most one, the larger shares first (``torch.tensor_split``'s rule); may be empty when ``count`` is
    smaller than ``world_size`` (the last batch of a small aspect bucket)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def check_collective(distributed: object) -> None:
    """Refuse a malformed collective before any training (a bad rank would silently drop samples)."""
    if not isinstance(distributed, Collective):
        raise ValueError("distributed must have rank, world_size and all_reduce_sum(tensor)")
    world, rank = distributed.world_size, distributed.rank
    if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
        raise ValueError(f"distributed needs 0 <= rank < world_size; got rank={rank!r}, world_size={world!r}")
