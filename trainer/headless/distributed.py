"""The Hugging Face ``accelerate`` glue: which process this is, its device, and the engine's collective.

A plain ``python -m trainer ...`` is one process and never imports accelerate. Under a launcher that starts
several processes (``accelerate launch --multi_gpu``, multi-node ``accelerate launch``, ``torchrun``), every
process builds one :class:`accelerate.Accelerator`; it reads the launcher's environment, joins the process
group (NCCL on GPUs, gloo on CPUs) and picks this process's device. The engine then sums the coefficient
gradients through :meth:`Accelerator.reduce` (see :mod:`trainer.parallel`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..parallel import Collective

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
SINGLE_CPU_LAUNCH = (
    "`accelerate launch --cpu --num_processes N` started a single process: accelerate runs several CPU "
    "processes only through mpirun (--mpirun_hostfile). Start them with `accelerate launch --multi_gpu "
    "--num_processes N -m trainer ...` (on a machine without GPUs every process then trains on the CPU), "
    "or with --num_processes 1 for one process."
)


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without a launcher)."""
    for var in _WORLD_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _asked_for_cpu_processes() -> bool:
    """True when ``accelerate launch --cpu --num_processes N>1`` ran us alone (it sets MASTER_ADDR for N > 1
    but, without mpirun, starts one process): training on would silently use another global batch."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return use_cpu and "MASTER_ADDR" in os.environ and launched_world_size() == 1


class AccelerateCollective:
    """:class:`trainer.parallel.Collective` over an ``accelerate.Accelerator``."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world_size = int(accelerator.num_processes)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")


@dataclass
class Process:
    """This process's place in the run: its device, rank, the collective (``None`` alone) and accelerator."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    collective: Collective | None = None
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a disk cache), the others after it (and find it filled)."""
        if self.accelerator is None:
            yield
            return
        with self.accelerator.main_process_first():
            yield


def default_device(cpu: bool = False) -> torch.device:
    """One process's device: CUDA if present (unless ``cpu``), else Apple's MPS, else the CPU."""
    if cpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(cpu: bool = False) -> Process:
    """This process, set up for the way it was started. Several processes need ``accelerate`` installed."""
    if _asked_for_cpu_processes():
        raise SystemExit(SINGLE_CPU_LAUNCH)
    if launched_world_size() == 1:
        return Process(default_device(cpu))
    try:
        from accelerate import Accelerator  # only here: the hosts and plain runs never need accelerate
    except ImportError:
        raise SystemExit(
            "several processes were launched but accelerate is not installed: pip install accelerate"
        ) from None
    # without a GPU each process trains on the CPU (gloo); accelerate needs to be told, or it runs them alone
    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
    collective = AccelerateCollective(accelerator)
    return Process(accelerator.device, collective.rank, collective.world_size, collective, accelerator)
