"""``python -m trainer train``: arguments. Training flags are derived from the settings dataclasses
(:func:`trainer.headless.config.option_fields`); this module adds only their help lines."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import settings as S
from .config import MODEL_DTYPES, OPTIONS, OptionField, RunConfig, Subject, load_run_file

HELP = {
    "steps": "optimiser steps (each uses batch-size x processes x grad-accum images)",
    "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_scheduler": f"after warm-up: {', '.join(S.SCHEDULERS)}",
    "warmup_steps": "linear warm-up steps",
    "batch_size": "images per micro-batch and process (one aspect bucket per batch)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "max_grad_norm": "clip the coefficients' gradient norm ('none': no clipping)",
    "mixed_precision": f"{', '.join(S.PRECISIONS)}; auto = the model's half type on a GPU, none on the CPU",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, slower)",
    "prediction_type": f"{', '.join(S.PREDICTION_TYPES)}; default: v_prediction if the checkpoint has a v_pred key",
    "noise_offset": "add noise-offset x N(0,1) per sample and channel to the noise",
    "min_snr_gamma": "min-SNR-gamma loss weighting ('none': off; 5 is usual)",
    "timestep_range": "train on timesteps drawn from [LO, HI)",
    "num_train_timesteps": "length of the DDPM schedule",
    "beta_start": "first beta of the scaled-linear schedule",
    "beta_end": "last beta of the scaled-linear schedule",
    "zero_terminal_snr": "rescale the schedule to zero terminal SNR (v-prediction only); default: on if the "
    "checkpoint has a ztsnr key (NoobAI-XL V-pred)",
    "seed": "training seed (batch order, noise, timesteps)",
    "save_every": "also save adapter + resume state every N steps (0: at the end and on a stop)",
    "resolution": "training resolution: images go to aspect buckets of about resolution^2 pixels",
    "n_frequency": "WaveFT coefficients per adapted layer (p)",
    "scaling": "WaveFT scaling s (dW = s * IDWT2(C))",
    "wavelet": "wavelet (haar/db1, dbN, symN, coifN, dmey)",
    "position_seed": "seed of the coefficient positions",
    "target_pattern": "regex of the UNet Linear layers to adapt (default: attention q, k, v, out)",
    "total_budget": "spread this many coefficients over the layers in proportion to their size (overrides n-frequency)",
}


def _parser_for(option: OptionField) -> dict[str, Any]:
    """argparse keywords for one option, from its type (``X | None`` accepts ``none``)."""
    kind, default = option.kind, option.default
    shown = "none" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f"{HELP.get(option.name, option.name)} (default {shown})"
    args = typing.get_args(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if typing.get_origin(kind) is tuple:
        return {"type": args[0], "nargs": len(args), "metavar": ("LO", "HI"), "help": help_text}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return {"type": lambda text: None if text.lower() == "none" else inner(text), "help": help_text}
    return {"type": kind, "help": help_text}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer train",
        description="Train WaveFT adapters on an SDXL single-file checkpoint (one subject, or many with --config). "
        "Runs data-parallel under `accelerate launch`.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint", type=Path, help="SDXL single-file checkpoint (.safetensors; fp32/fp16/bf16)")
    run.add_argument("--images", type=Path, help="folder of subject images (png, jpg, webp, bmp)")
    run.add_argument("--prompt", help='instance prompt, e.g. "a photo of zjw dog"')
    run.add_argument("--output", type=Path, help="adapter file to write (.safetensors); beside it NAME.waveft-state "
                     "(resume state) and NAME_loss.png")  # fmt: skip
    run.add_argument("--config", type=Path, help="TOML run file with several [[subject]] entries (README)")
    run.add_argument("--cache-dir", type=Path, help="keep latents and text embeddings here and reuse them across runs")
    run.add_argument("--model-dtype", choices=MODEL_DTYPES, help="weights of the UNet and text encoders in memory "
                     "(auto: fp32 on the CPU, bf16 on GPUs that have it, else fp16; the VAE always encodes in fp32)")
    run.add_argument("--resume", action="store_true", help="continue the run saved beside --output (any process count "
                     "with the same global batch)")  # fmt: skip
    run.add_argument("--overwrite", action="store_true", help="start over even if --output exists")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    train = parser.add_argument_group("training options (the paper's defaults; also keys of [train] / [[subject]])")
    for option in OPTIONS.values():
        train.add_argument("--" + option.name.replace("_", "-"), dest=option.name, default=argparse.SUPPRESS,
                           **_parser_for(option))  # absent unless given: "none" is a value
    return parser


def parse_config(argv: Sequence[str]) -> RunConfig:
    """A :class:`RunConfig` from command-line arguments (``ValueError`` for bad combinations or values)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    options = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    run = {"checkpoint": args.checkpoint, "cache_dir": args.cache_dir, "model_dtype": args.model_dtype}
    flags = {"resume": args.resume, "overwrite": args.overwrite, "cpu": args.cpu}
    one = {"images": args.images, "prompt": args.prompt, "output": args.output}
    if args.config is not None:
        given = [f"--{k}" for k, v in one.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --config (put subjects in the file)")
        return load_run_file(args.config, options, **run, **flags)
    missing = [f"--{k}" for k, v in {"checkpoint": args.checkpoint, **one}.items() if v is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --config RUN.toml)")
    run = {k: v for k, v in run.items() if v is not None}
    return RunConfig(subjects=[Subject(**one)], options=options, **run, **flags)


def main(argv: Sequence[str]) -> int:
    """Parse, run, and turn expected failures into one-line errors (exit code 2; 130/143 after a stop)."""
    from .run import run_config

    try:
        config = parse_config(argv)
        return run_config(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", flush=True)
        return 2
