"""Conversions between WaveFT files and the outside world: PEFT folders in, merged SDXL checkpoints out.

* ``convert_peft``: a folder saved by PEFT's WaveFT on a diffusers SDXL UNet (``adapter_config.json`` +
  ``adapter_model.safetensors`` with ``base_model.model.<diffusers path>.waveft_spectrum``) becomes a v1
  file. PEFT stores neither shapes nor positions; both follow from the SDXL layer table and the config's
  ``random_loc_seed`` (PEFT's positions are ``sample_positions(out, in, p, seed)``), so ``dW`` is identical.
* ``bake_checkpoint``: ``W += strength * dW`` for every adapted layer of an SDXL single-file checkpoint
  (sgm key names). OpenCLIP bigG (text encoder 2) fuses q, k, v into ``attn.in_proj_weight`` and stores
  ``text_projection`` transposed, so those layers land in a slice / transpose of the stored tensor.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .adapter_file import (
    AdapterFile,
    AdapterFileError,
    LayerAdapter,
    layer_from_tensors,
    load_adapter,
    read_header,
    read_small_json,
    read_tensors,
    save_adapter,
    save_tensors_atomic,
)
from .names import KOHYA_PREFIX, peft_key_to_kohya, sdxl_kohya_table


def convert_peft(peft_dir: str | os.PathLike, out_path: str | os.PathLike) -> AdapterFile:
    """Turn a PEFT WaveFT folder (diffusers SDXL UNet) into a v1 file at ``out_path``; returns it."""
    peft_dir = Path(peft_dir)
    wavelet, scaling, seed = peft_settings(peft_dir / "adapter_config.json")
    table = sdxl_kohya_table()
    weights = peft_dir / "adapter_model.safetensors"
    header, _ = read_header(weights)
    layers: dict[str, LayerAdapter] = {}
    for key, tensor in read_tensors(weights, header).items():
        if not key.endswith(".waveft_spectrum") or tensor.dim() != 1 or not tensor.is_floating_point():
            raise AdapterFileError(f"{weights.name}: {key}: not a WaveFT spectrum tensor")
        prefix = peft_key_to_kohya(key.removesuffix(".waveft_spectrum"))
        if prefix is None or prefix not in table:
            raise AdapterFileError(f"{weights.name}: {key}: not a Linear of the SDXL UNet")
        layers[prefix] = _validated(prefix, tensor.to(torch.float32), table[prefix][2], scaling, wavelet, seed)
    if not layers:
        raise AdapterFileError(f"{weights.name}: no waveft_spectrum tensors")
    save_adapter(out_path, layers, {"waveft_converted_from": "peft"})
    return load_adapter(out_path)


MAX_STRENGTH = 100.0  # the loader nodes' slider range
PEFT_DEFAULTS = {"wavelet_family": "db1", "scaling": 25.0, "random_loc_seed": 777}


def peft_settings(config_path: str | os.PathLike, required: bool = True) -> tuple[str, float, int]:
    """``(wavelet, scaling, seed)`` of a PEFT WaveFT ``adapter_config.json``, checked: the one reader of PEFT
    configs. Without the file: an error, or with ``required=False`` PEFT's defaults."""
    config_path = Path(config_path)
    if not config_path.exists() and not required:
        config: object = {}
    else:
        config = read_small_json(config_path)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path}: not a JSON object")
    if config.get("peft_type") is not None and str(config["peft_type"]).upper() != "WAVEFT":
        raise AdapterFileError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not WAVEFT")
    if not config.get("use_idwt", True):
        raise AdapterFileError(f"{config_path}: use_idwt=False adapters (no wavelet transform) are not supported")
    values = {**PEFT_DEFAULTS, **{k: config[k] for k in PEFT_DEFAULTS if config.get(k) is not None}}
    try:
        wavelet, scaling, seed = str(values["wavelet_family"]), float(values["scaling"]), int(values["random_loc_seed"])
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{config_path}: malformed WaveFT settings ({err})") from None
    if not math.isfinite(scaling) or seed < 0:
        raise AdapterFileError(f"{config_path}: scaling {scaling} / random_loc_seed {seed} out of range")
    return wavelet, scaling, seed


def _validated(prefix: str, coef: torch.Tensor, shape: tuple[int, int], scaling: float, wavelet: str, seed: int):
    """The same checks as a v1 file gets (budget fits, finite values, known wavelet), before it is written."""
    layer = LayerAdapter(coef, shape, scaling, wavelet, seed=seed)
    return layer_from_tensors(prefix, {k.rpartition(".")[2]: v for k, v in layer.tensors(prefix).items()})


def checkpoint_target(prefix: str, shape: tuple[int, int]) -> tuple[str, slice | None, bool]:
    """Where layer ``prefix`` lives in an SDXL (sgm) checkpoint: (key, row slice or None, stored transposed)."""
    component = next((c for c, p in KOHYA_PREFIX.items() if prefix.startswith(p)), None)
    table = sdxl_kohya_table()
    if component is None or prefix not in table:
        raise AdapterFileError(f"{prefix}: not an SDXL layer (cannot place it in a checkpoint)")
    path = table[prefix][1]
    if component == "unet":
        return f"model.diffusion_model.{path}.weight", None, False
    if component == "te1":
        return f"conditioner.embedders.0.transformer.{path}.weight", None, False
    return _open_clip_target(path, shape[0])


def _open_clip_target(path: str, dim: int) -> tuple[str, slice | None, bool]:
    base = "conditioner.embedders.1.model"
    if path == "text_projection":
        return f"{base}.text_projection", None, True
    match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    assert match is not None
    block, rest = f"{base}.transformer.resblocks.{match.group(1)}", match.group(2)
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if rest in qkv:
        return f"{block}.attn.in_proj_weight", slice(qkv[rest] * dim, (qkv[rest] + 1) * dim), False
    renames = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    return f"{block}.{renames[rest]}.weight", None, False


def bake_checkpoint(
    checkpoint: str | os.PathLike, adapter: str | os.PathLike, out_path: str | os.PathLike, strength: float = 1.0
) -> int:
    """Write ``checkpoint`` with ``strength * dW`` merged into every adapted weight; returns layers merged.

    Every adapter layer must find its weight with the right shape, and every merged weight must stay finite
    (a huge strength overflows an fp16 checkpoint), else nothing is written.
    """
    if not (math.isfinite(strength) and abs(strength) <= MAX_STRENGTH):
        raise ValueError(f"strength {strength} must be a finite number within +-{MAX_STRENGTH:g}")
    loaded = load_adapter(adapter)
    header, metadata = read_header(checkpoint)
    targets = {prefix: checkpoint_target(prefix, layer.shape) for prefix, layer in loaded.layers.items()}
    missing = sorted(prefix for prefix, (key, _, _) in targets.items() if key not in header)
    if missing:
        raise AdapterFileError(f"{Path(checkpoint).name}: no weight for {len(missing)} adapter layer(s): {missing[:5]}")
    tensors = read_tensors(checkpoint, header)
    for prefix, (key, rows, transposed) in targets.items():
        weight = tensors[key][rows] if rows is not None else tensors[key]
        weight = weight.t() if transposed else weight
        if tuple(weight.shape) != tuple(loaded.layers[prefix].shape):
            raise AdapterFileError(f"{prefix}: adapter shape {loaded.layers[prefix].shape} != {key} {tuple(weight.shape)}")
        loaded.layers[prefix].add_to_(weight, strength)
        if not torch.isfinite(weight).all():
            raise AdapterFileError(f"{prefix}: merged at strength {strength}, {key} would hold Inf or NaN ({weight.dtype})")
    metadata = {**metadata, "waveft_baked": f"{Path(adapter).name}@{strength}"}
    save_tensors_atomic(tensors, out_path, metadata)
    return len(targets)
