"""Command line: ``python -m trainer demo [--steps N] [--output PATH] [--seed S] [--batch-size B]`` and
``python -m trainer train ...`` (the headless trainer, :mod:`trainer.headless`; ``--help`` lists its options).

Both also run as one of several data-parallel processes under ``accelerate launch`` (or ``torchrun``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .demo import DEFAULT_OUTPUT, run_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="WaveFT training engine")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny built-in SDXL-architecture UNet on a synthetic subject")
    demo.add_argument("--steps", type=int, default=120, help="optimiser steps (default 120)")
    demo.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"adapter file (default {DEFAULT_OUTPUT})")
    demo.add_argument("--seed", type=int, default=777, help="training seed (default 777)")
    demo.add_argument(
        "--batch-size", type=int, default=2, help="samples per step and process (default 2; x grad accumulation 2)"
    )
    commands.add_parser(
        "train", add_help=False, help="train adapters on an SDXL checkpoint (python -m trainer train --help)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser; imported only here, so the demo never loads the headless parts
        from .headless.cli import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    for beta_note in ("Sparse CSR tensor support is in beta state", "Sparse invariant checks are implicitly disabled"):
        warnings.filterwarnings("ignore", message=beta_note, category=UserWarning)  # torch notes, not problems
    if args.command == "demo":
        # the demo's matrices are tiny: extra threads only add synchronisation, and on a busy machine
        # OpenMP threads that spin-wait for each other make a run tens of times slower
        torch.set_num_threads(1)
        if args.batch_size < 1:
            parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
        from .headless.distributed import launched_world_size, setup

        if launched_world_size() > 1 or os.environ.get("ACCELERATE_USE_CPU"):  # started by a launcher
            process = setup(cpu=True)  # the demo's model is tiny: the CPU is the right device
            run_demo(args.output, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                     distributed=process.collective)  # fmt: skip
            process.barrier()
        else:
            run_demo(args.output, steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
