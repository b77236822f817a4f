"""``python -m waveft_core``: inspect a WaveFT file, convert a PEFT folder, bake an adapter into a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .adapter_file import AdapterFileError, load_adapter
from .convert import bake_checkpoint, convert_peft
from .names import printable


def summarize(path: str) -> dict:
    """What ``inspect`` reports: layer count and names, parameters, wavelet, scaling, seed, base model."""
    adapter = load_adapter(path)
    layers = adapter.layers.values()
    components = Counter((prefix.split("_") + ["?"])[1] for prefix in adapter.layers)
    return {
        "file": str(Path(path).name),
        "format_version": adapter.metadata.get("waveft_version"),
        "layers": len(adapter.layers),
        "layers_by_component": dict(components),
        "total_parameters": adapter.num_params,
        "wavelets": sorted({layer.wavelet for layer in layers}),
        "scalings": sorted({layer.scaling for layer in layers}),
        "seeds": sorted({layer.seed for layer in layers if layer.seed is not None}),
        "positions_stored": sum(layer.positions is not None for layer in layers),
        "base_model": adapter.metadata.get("ss_base_model_version"),
        "output_name": adapter.metadata.get("ss_output_name"),
        "metadata": adapter.metadata,
        "layer_names": sorted(adapter.layers),
    }


def _print_summary(info: dict) -> None:
    print(printable(f"{info['file']}: WaveFT v{info['format_version']}, base model {info['base_model']}"))
    print(printable(f"  layers: {info['layers']} {info['layers_by_component']}, parameters: {info['total_parameters']:,}"))
    print(f"  wavelet: {', '.join(info['wavelets'])}  scaling: {', '.join(map(str, info['scalings']))}")
    print(f"  seed: {', '.join(map(str, info['seeds'])) or '-'}  layers with stored positions: {info['positions_stored']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m waveft_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe a WaveFT .safetensors file")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    convert = commands.add_parser("convert-peft", help="PEFT WaveFT folder (diffusers SDXL UNet) -> v1 file")
    convert.add_argument("peft_dir")
    convert.add_argument("out")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    bake = commands.add_parser("bake", help="merge an adapter into an SDXL single-file checkpoint")
    bake.add_argument("checkpoint")
    bake.add_argument("adapter")
    bake.add_argument("out")
    bake.add_argument("--strength", type=float, default=1.0)
    bake.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never CHECKPOINT itself)")
    return parser


def check_output(out: str, overwrite: bool, *sources: str) -> None:
    """Refuse to write over an input (a baked checkpoint over its own base model) or, unasked, any file."""
    target = Path(out).resolve()
    if any(Path(source).resolve() == target for source in sources):
        raise ValueError(f"{out} is also an input: write the result to another file")
    if target.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose another name or pass --overwrite")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            info = summarize(args.file)
            print(json.dumps(info, indent=2)) if args.json else _print_summary(info)
        elif args.command == "convert-peft":
            check_output(args.out, args.overwrite)
            adapter = convert_peft(args.peft_dir, args.out)
            print(f"wrote {args.out}: {len(adapter.layers)} layers, {adapter.num_params:,} parameters")
        else:
            check_output(args.out, args.overwrite, args.checkpoint, args.adapter)
            merged = bake_checkpoint(args.checkpoint, args.adapter, args.out, args.strength)
            print(f"wrote {args.out}: {merged} layers merged at strength {args.strength}")
    except (AdapterFileError, ValueError, OSError) as err:  # OSError: missing file, a directory, a full disk
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    return 0
