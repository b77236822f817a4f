"""Command line: ``python -m trainer demo [--steps N] [--output PATH] [--seed S]``."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    for beta_note in ("Sparse CSR tensor support is in beta state", "Sparse invariant checks are implicitly disabled"):
        warnings.filterwarnings("ignore", message=beta_note, category=UserWarning)  # torch notes, not problems
    if args.command == "demo":
        # the demo's matrices are tiny: extra threads only add synchronisation, and on a busy machine
        # OpenMP threads that spin-wait for each other make a run tens of times slower
        torch.set_num_threads(1)
        run_demo(args.output, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
