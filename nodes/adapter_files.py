"""Reading adapter files for the loader nodes: WaveFT v1 files, and PEFT WaveFT folders as they are.

A v1 file is self-describing and goes straight to :func:`waveft_core.load_adapter`. PEFT saves
``adapter_model.safetensors`` (``base_model.model.<diffusers path>.waveft_spectrum``, coefficients only) next
to ``adapter_config.json`` (wavelet, scaling, position seed); the layer shapes are the model's own, so such
a file is read against the model's weights (``shape_of``) and every layer is still validated by
:func:`waveft_core.layer_from_tensors`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..waveft_core import AdapterFileError, LayerAdapter, layer_from_tensors, load_adapter
from ..waveft_core.adapter_file import read_header
from ..waveft_core.convert import PEFT_DEFAULTS, peft_settings

log = logging.getLogger("WaveFT")
PEFT_SUFFIX = ".waveft_spectrum"
ShapeOf = Callable[[str], "tuple[int, ...] | None"]


def is_peft_file(path: str | Path) -> bool:
    """True if ``path`` holds PEFT WaveFT tensors (``*.waveft_spectrum``) rather than a v1 file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(key.endswith(PEFT_SUFFIX) for key in handle.keys())
    except Exception as err:  # safetensors refuses anything that is not a well-formed file
        raise AdapterFileError(f"{Path(path).name}: not a readable safetensors file ({err})") from None


def peft_config(path: Path) -> dict:
    """The WaveFT settings of a PEFT folder (``adapter_config.json`` beside the weights), checked by the core's
    one PEFT reader; without the file PEFT's defaults, with a warning."""
    config_path = path.parent / "adapter_config.json"
    if not config_path.exists():
        log.warning("[WaveFT] %s: no adapter_config.json beside it; assuming PEFT's defaults %s", path.name, PEFT_DEFAULTS)
    wavelet, scaling, seed = peft_settings(config_path, required=False)
    return {"wavelet_family": wavelet, "scaling": scaling, "random_loc_seed": seed}


def _peft_tensors(spectrum: torch.Tensor, shape: tuple[int, ...], config: dict) -> dict[str, torch.Tensor]:
    return {
        "waveft_coef": spectrum.to(torch.float32) if spectrum.is_floating_point() else spectrum,
        "waveft_shape": torch.tensor([int(n) for n in shape], dtype=torch.int64),
        "waveft_scale": torch.tensor(float(config["scaling"]), dtype=torch.float32),
        "waveft_wavelet": torch.tensor(list(str(config["wavelet_family"]).encode("ascii", "replace")), dtype=torch.uint8),
        "waveft_seed": torch.tensor(int(config["random_loc_seed"]), dtype=torch.int64),
    }


def read_peft(path: Path, shape_of: ShapeOf) -> tuple[dict[str, LayerAdapter], list[str]]:
    """Layers of a PEFT WaveFT file whose modules ``shape_of`` knows; also the keys it does not know."""
    config = peft_config(path)
    layers: dict[str, LayerAdapter] = {}
    unknown: list[str] = []
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if not key.endswith(PEFT_SUFFIX):
                raise AdapterFileError(f"{path.name}: {key}: not a WaveFT spectrum tensor")
            prefix = key[: -len(PEFT_SUFFIX)]
            shape = shape_of(prefix)
            if shape is None or len(shape) != 2:
                unknown.append(prefix)
                continue
            entry = handle.get_slice(key)  # check size and rank before reading anything
            numel = 1
            for n in entry.get_shape():
                numel *= n
            if len(entry.get_shape()) != 1 or not 0 < numel <= shape[0] * shape[1]:
                raise AdapterFileError(f"{path.name}: {key}: {entry.get_shape()} coefficients for a {shape} weight")
            try:
                layers[prefix] = layer_from_tensors(prefix, _peft_tensors(handle.get_tensor(key), shape, config))
            except AdapterFileError as err:
                raise AdapterFileError(f"{path.name}: {err}") from None
    return layers, unknown


def is_core_trainer_file(path: str | Path) -> bool:
    """True for a file of ComfyUI's core Train LoRA node trained with the WaveFT algorithm: WaveFT layers
    without the format's metadata, beside the trainer's own ``diff`` / ``diff_b`` entries for norms and
    biases. ComfyUI's own LoRA loading applies those; the WaveFT layers go through our adapter class."""
    header, metadata = read_header(path)
    return "waveft_version" not in metadata and any(key.endswith(".waveft_coef") for key in header)


def read_adapter(path: str | Path, shape_of: ShapeOf) -> tuple[dict[str, LayerAdapter], dict[str, str], list[str]]:
    """``(layers by file prefix, metadata, prefixes that could not be sized)`` of a v1 or PEFT file."""
    path = Path(path)
    if is_peft_file(path):
        layers, unknown = read_peft(path, shape_of)
        if not layers and unknown:
            raise AdapterFileError(
                f"{path.name}: none of its {len(unknown)} PEFT layer(s) match a weight of this model "
                f"(e.g. {', '.join(unknown[:3])}). Was it trained for another model family?"
            )
        return layers, {"waveft_converted_from": "peft"}, unknown
    adapter = load_adapter(path)
    return adapter.layers, adapter.metadata, []
