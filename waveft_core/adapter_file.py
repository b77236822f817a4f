"""The WaveFT adapter file, format v1: one ``.safetensors``, every layer self-describing.

Per layer, under its kohya-style prefix (``lora_unet_...``, ``lora_te1_...``, ``lora_te2_...``)::

    <prefix>.waveft_coef     float32 [p]   trained coefficients (unscaled)
    <prefix>.waveft_shape    int64   [2]   (out, in) of the adapted weight
    <prefix>.waveft_scale    float32 []    scaling s
    <prefix>.waveft_wavelet  uint8   [k]   wavelet name in ASCII
    <prefix>.waveft_seed     int64   []    positions = sample_positions(out, in, p, seed)   } exactly
    <prefix>.waveft_pos      int64   [p]   explicit flat positions                           } one of

Applied update: ``W += strength * s * IDWT2(C)``. Files come from the internet: everything is validated, the
header before any tensor is read, and every error names the offending key.

A v1 file holds exactly these dtypes. Layers handed over as bare tensors (:func:`layer_from_tensors`, what the
hosts' stock LoRA loaders use) may also come from ComfyUI's core trainer, which saves every tensor in its LoRA
dtype: half-precision coefficients and scale are widened, and float-stored integers accepted when exact.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import LayerAdapter
from .errors import AdapterFileError
from .positions import check_positions
from .wavelets import check_wavelet

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_WEIGHT_ELEMENTS = 1 << 28  # 16384 x 16384: beyond any SDXL layer; bounds what a hostile shape can allocate
MAX_LAYERS = 10_000  # SDXL has under 2,300 Linear layers; bounds a file's load time and memory
MAX_WAVELET_NAME = 64  # the longest supported name is 7 characters
# |scaling| * max|coefficient| of a layer: a trained adapter is near 1 (25 x 0.05); beyond this bound the update
# would swamp the weight (and overflow an fp16 model), which only a broken or hostile file does
MAX_UPDATE = 1e4
MAX_JSON_BYTES = 1 << 20
SUFFIXES = ("waveft_coef", "waveft_shape", "waveft_scale", "waveft_wavelet", "waveft_seed", "waveft_pos")
_HEADER_SPEC = {  # suffix -> (safetensors dtype, rank)
    "waveft_coef": ("F32", 1),
    "waveft_shape": ("I64", 1),
    "waveft_scale": ("F32", 0),
    "waveft_wavelet": ("U8", 1),
    "waveft_seed": ("I64", 0),
    "waveft_pos": ("I64", 1),
}


@dataclass
class AdapterFile:
    layers: dict[str, LayerAdapter]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers.values())


WAVEFT_PART = "waveft_"  # every tensor name of the format starts so; no other adapter type's does


def group_layer_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The WaveFT tensors of a state dict grouped per layer, ``prefix -> {"waveft_*": tensor}``, as a host
    that reads a file itself hands them over. Keys split at their last dot (WaveFT names contain none; hosts
    that split at the first dot agree for kohya prefixes, which contain none either)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix, _, part = key.rpartition(".")
        if prefix and part.startswith(WAVEFT_PART):
            groups.setdefault(prefix, {})[part] = tensor
    return groups


def layer_from_tensors(
    prefix: str, tensors: Mapping[str, torch.Tensor], expected_shape: tuple[int, int] | None = None
) -> LayerAdapter:
    """Validate one layer's tensors (keys are the suffixes, e.g. ``waveft_coef``) and build the layer; with
    ``expected_shape``, the model weight's ``(out, in)`` it must fit.

    The one validator of every loader: :func:`load_adapter`, the ComfyUI-protocol adapter the stock loaders
    use, and the WebUI glue. A tensor that is not ``waveft_*`` is refused: a host would apply it too.
    """
    foreign = sorted(part for part in tensors if not part.startswith(WAVEFT_PART))
    if foreign:
        raise AdapterFileError(f"{prefix}: WaveFT layer also has non-WaveFT tensor(s) {foreign}")
    unknown = sorted(set(tensors) - set(SUFFIXES))
    if unknown:
        raise AdapterFileError(f"{prefix}: unknown WaveFT tensor(s) {unknown}")
    for suffix in ("waveft_coef", "waveft_shape", "waveft_scale", "waveft_wavelet"):
        if suffix not in tensors:
            raise AdapterFileError(f"{prefix}.{suffix}: missing")
    if ("waveft_seed" in tensors) == ("waveft_pos" in tensors):
        raise AdapterFileError(f"{prefix}: needs exactly one of waveft_seed and waveft_pos")
    tensors = _from_trainer_dtypes(prefix, tensors)
    _check_dtypes(prefix, tensors)
    shape = _read_shape(prefix, tensors["waveft_shape"])
    coef = tensors["waveft_coef"]
    p = coef.numel()
    if not 0 < p <= shape[0] * shape[1]:
        raise AdapterFileError(f"{prefix}.waveft_coef: {p} coefficients for a {shape[0]}x{shape[1]} weight")
    if not torch.isfinite(coef).all():
        raise AdapterFileError(f"{prefix}.waveft_coef: contains NaN or Inf")
    scaling = float(tensors["waveft_scale"])
    if not math.isfinite(scaling):
        raise AdapterFileError(f"{prefix}.waveft_scale: not finite ({scaling})")
    largest = abs(scaling) * float(coef.abs().max())
    if not largest <= MAX_UPDATE:
        raise AdapterFileError(
            f"{prefix}.waveft_scale: scaling x largest coefficient is {largest:.3g}, beyond {MAX_UPDATE:g} "
            "(the update would swamp or overflow the weights)"
        )
    if tensors["waveft_wavelet"].numel() > MAX_WAVELET_NAME:
        raise AdapterFileError(f"{prefix}.waveft_wavelet: {tensors['waveft_wavelet'].numel()} bytes is no wavelet name")
    wavelet = _read_wavelet(prefix, tensors["waveft_wavelet"])
    if "waveft_pos" in tensors:
        positions = tensors["waveft_pos"]
        try:
            check_positions(positions, shape[0], shape[1], f"{prefix}.waveft_pos")
        except ValueError as err:
            raise AdapterFileError(str(err)) from None
        if positions.numel() != p:
            raise AdapterFileError(f"{prefix}.waveft_pos: {positions.numel()} positions for {p} coefficients")
        return _check_fits(prefix, LayerAdapter(coef.float(), shape, scaling, wavelet, positions=positions), expected_shape)
    seed = int(tensors["waveft_seed"])
    if seed < 0:
        raise AdapterFileError(f"{prefix}.waveft_seed: negative seed {seed}")
    return _check_fits(prefix, LayerAdapter(coef.float(), shape, scaling, wavelet, seed=seed), expected_shape)


def _check_fits(prefix: str, layer: LayerAdapter, expected_shape: tuple[int, int] | None) -> LayerAdapter:
    if expected_shape is not None and tuple(layer.shape) != tuple(expected_shape):
        raise AdapterFileError(
            f"{prefix}.waveft_shape: adapter is for a {layer.shape[0]}x{layer.shape[1]} weight, "
            f"the model's layer is {expected_shape[0]}x{expected_shape[1]}"
        )
    return layer


# ComfyUI's core trainer keeps a train module's parameters only and saves every one in its LoRA dtype (bf16
# or fp32), integers included; such a layer is read back when each integer survived exactly.
_INTEGER_SUFFIXES = {"waveft_shape": torch.int64, "waveft_seed": torch.int64, "waveft_wavelet": torch.uint8}


def _from_trainer_dtypes(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's tensors in the format's dtypes: half-precision floats widened to float32, integers stored as
    floats turned back into integers when every value is an exact integer in range; anything else unchanged
    (and refused by :func:`_check_dtypes`, naming the key)."""
    out = dict(tensors)
    for suffix, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dtype == torch.float32 and suffix not in _INTEGER_SUFFIXES:
            continue
        if suffix in ("waveft_coef", "waveft_scale") and tensor.dtype in (torch.float16, torch.bfloat16):
            out[suffix] = tensor.to(torch.float32)
        elif suffix in _INTEGER_SUFFIXES:
            wide = tensor.to(torch.float64)
            limit = 255 if suffix == "waveft_wavelet" else 2**53
            if not (torch.isfinite(wide).all() and (wide == wide.round()).all() and (wide.abs() <= limit).all()):
                raise AdapterFileError(f"{prefix}.{suffix}: stored as {tensor.dtype} but not exact integers")
            out[suffix] = wide.to(_INTEGER_SUFFIXES[suffix])
    return out


def _check_dtypes(prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
    wanted = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}
    for suffix, tensor in tensors.items():
        dtype, rank = _HEADER_SPEC[suffix]
        if tensor.dtype != wanted[dtype] or tensor.dim() != rank:
            raise AdapterFileError(
                f"{prefix}.{suffix}: expected {wanted[dtype]} of rank {rank}, got {tensor.dtype} {tuple(tensor.shape)}"
            )


def _read_shape(prefix: str, tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.numel() != 2:
        raise AdapterFileError(f"{prefix}.waveft_shape: expected 2 values, got {tensor.numel()}")
    out_features, in_features = (int(v) for v in tensor.tolist())
    if out_features <= 0 or in_features <= 0 or out_features * in_features > MAX_WEIGHT_ELEMENTS:
        raise AdapterFileError(f"{prefix}.waveft_shape: implausible weight shape ({out_features}, {in_features})")
    return out_features, in_features


def _read_wavelet(prefix: str, tensor: torch.Tensor) -> str:
    raw = bytes(tensor.tolist()[:64])
    try:
        return check_wavelet(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise AdapterFileError(f"{prefix}.waveft_wavelet: {err}") from None


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Parse and bound-check a safetensors header without reading tensor data: (entries, metadata)."""
    path = Path(path)
    require_regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path.name}: not a safetensors file (truncated before the header)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise AdapterFileError(f"{path.name}: not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise AdapterFileError(f"{path.name}: not a safetensors file (bad header: {type(err).__name__})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path.name}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path.name}: not a safetensors file (__metadata__ is not an object)")
    data_size = size - 8 - length
    for key, entry in header.items():
        _check_layout(path, key, entry, data_size)
    return header, {str(k): str(v) for k, v in metadata.items()}


def require_regular_file(path: Path) -> None:
    """Refuse what is not a regular file (after symlinks): a FIFO would block the reader forever, a device
    such as ``/dev/zero`` never ends."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise AdapterFileError(f"{path.name}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise AdapterFileError(f"{path.name}: not a regular file")


def read_small_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> object:
    """A small JSON file (a PEFT ``adapter_config.json``): regular, at most ``limit`` bytes, parsed without a
    recursion blow-up; every failure is an :class:`AdapterFileError` naming the file."""
    path = Path(path)
    require_regular_file(path)
    if path.stat().st_size > limit:
        raise AdapterFileError(f"{path}: {path.stat().st_size} bytes is too large for a config")
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterFileError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None


_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _check_layout(path: Path, key: str, entry: object, data_size: int) -> None:
    """Each tensor's shape, dtype and byte range must be well-formed and agree, before the library reads it."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    well_formed = (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
    )
    if not well_formed or not 0 <= offsets[0] <= offsets[1] <= data_size:
        raise AdapterFileError(f"{path.name}: {key}: data lies outside the file (truncated or corrupt)")
    item = _ITEM_SIZE.get(entry.get("dtype"))
    if item is not None and offsets[1] - offsets[0] != math.prod(shape) * item:
        raise AdapterFileError(f"{path.name}: {key}: byte range does not match its shape and dtype (corrupt)")


def read_tensors(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` of a safetensors file (after :func:`read_header` checked it); never unpickles."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except Exception as err:  # the library's own checks (overlaps, unknown dtypes ...): still a bad file
        raise AdapterFileError(f"{Path(path).name}: unreadable safetensors data ({err})") from None


def _check_entry(path: Path, key: str, entry: dict) -> None:
    suffix = key.rpartition(".")[2]
    if suffix not in _HEADER_SPEC:
        raise AdapterFileError(f"{path.name}: {key}: not a WaveFT tensor")
    dtype, rank = _HEADER_SPEC[suffix]
    shape = entry["shape"]
    if entry.get("dtype") != dtype or len(shape) != rank:
        raise AdapterFileError(f"{path.name}: {key}: expected dtype {dtype} of rank {rank}, got {entry.get('dtype')} {shape}")
    limit = {"waveft_shape": 2, "waveft_wavelet": MAX_WAVELET_NAME}.get(suffix, MAX_WEIGHT_ELEMENTS)
    if rank and not 0 < shape[0] <= limit:
        raise AdapterFileError(f"{path.name}: {key}: implausible length {shape[0]}")


def load_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and fully validate a v1 WaveFT file; raises :class:`AdapterFileError` naming the bad key."""
    path = Path(path)
    header, metadata = read_header(path)
    version = metadata.get("waveft_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{path.name}: waveft_version is {version!r}; this build reads version {FORMAT_VERSION}")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    if len(header) > len(SUFFIXES) * MAX_LAYERS:
        raise AdapterFileError(f"{path.name}: {len(header)} tensors, more than {MAX_LAYERS} layers can hold")
    for key, entry in header.items():
        _check_entry(path, key, entry)
    for key, tensor in read_tensors(path, header).items():
        prefix, _, suffix = key.rpartition(".")
        grouped.setdefault(prefix, {})[suffix] = tensor
    if not grouped:
        raise AdapterFileError(f"{path.name}: contains no WaveFT layers")
    if len(grouped) > MAX_LAYERS:
        raise AdapterFileError(f"{path.name}: {len(grouped)} layers; a WaveFT file has at most {MAX_LAYERS}")
    layers = {}
    for prefix, tensors in grouped.items():
        try:
            layers[prefix] = layer_from_tensors(prefix, tensors)
        except AdapterFileError as err:
            raise AdapterFileError(f"{path.name}: {err}") from None
    return AdapterFile(layers, metadata)


def default_metadata(layers: Mapping[str, LayerAdapter], output_name: str, base_model: str) -> dict[str, str]:
    def uniform(values: set) -> str:
        return str(values.pop()) if len(values) == 1 else "mixed"

    return {
        "waveft_version": FORMAT_VERSION,
        "waveft_wavelet": uniform({layer.wavelet for layer in layers.values()}),
        "waveft_scaling": uniform({float(layer.scaling) for layer in layers.values()}),
        "waveft_seed": uniform({layer.seed if layer.positions is None else "explicit" for layer in layers.values()}),
        "waveft_num_params": str(sum(layer.num_params for layer in layers.values())),
        "ss_network_module": "waveft",
        "ss_base_model_version": base_model,
        "ss_output_name": output_name,
    }


def save_adapter(
    path: str | os.PathLike,
    layers: Mapping[str, LayerAdapter],
    metadata: Mapping[str, str] | None = None,
    base_model: str = "sdxl_base_v1-0",
) -> Path:
    """Write ``layers`` (kohya prefix -> layer) atomically: a temporary file in the same folder, then rename.

    ``metadata`` adds to (and may override) the defaults of :func:`default_metadata`.
    """
    path = Path(path)
    if not layers:
        raise AdapterFileError("refusing to save an adapter with no layers")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, layer in layers.items():
        tensors.update(layer.tensors(prefix))
    meta = default_metadata(layers, path.stem, base_model)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_tensors_atomic(tensors, path, meta)


def save_adapter_new(
    candidates: Iterable[str | os.PathLike],
    layers: Mapping[str, LayerAdapter],
    metadata: Mapping[str, str] | None = None,
    base_model: str = "sdxl_base_v1-0",
) -> Path:
    """Save ``layers`` under the first of ``candidates`` that does not exist yet, never replacing a file.

    The file is written once under a hidden temporary name and then hard-linked to a free name (a link never
    replaces an existing file, so concurrent saves cannot collide): a crash at any moment leaves no empty or
    partial file under a real name, only the temporary, which later saves into that folder sweep away.
    ``ss_output_name`` defaults to the first candidate's stem.
    """
    remaining = iter(candidates)
    first = Path(next(remaining))
    first.parent.mkdir(parents=True, exist_ok=True)
    if not layers:
        raise AdapterFileError("refusing to save an adapter with no layers")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, layer in layers.items():
        tensors.update(layer.tensors(prefix))
    temporary = _write_temporary(tensors, first, {**default_metadata(layers, first.stem, base_model),
                                                  **{str(k): str(v) for k, v in (metadata or {}).items()}})
    try:
        for candidate in itertools.chain([first], map(Path, remaining)):
            try:
                os.link(temporary, candidate)
            except FileExistsError:
                continue
            return candidate
        raise FileExistsError(f"no free file name among {first.name} and its numbered variants in {first.parent}")
    finally:
        temporary.unlink(missing_ok=True)


STALE_TEMPORARY_SECONDS = 3600


def sweep_stale_temporaries(folder: Path) -> None:
    """Remove this project's temporaries (``.<name>.<random>.tmp``) over an hour old in ``folder``: what a
    process killed while saving left behind. Anything else is left alone."""
    now = time.time()
    for candidate in folder.glob(".*.tmp"):
        if not re.fullmatch(r"\..+\.(safetensors|waveft-state)\.[A-Za-z0-9_]{8}\.tmp", candidate.name):
            continue
        with contextlib.suppress(OSError):
            if now - candidate.lstat().st_mtime > STALE_TEMPORARY_SECONDS and stat.S_ISREG(candidate.lstat().st_mode):
                candidate.unlink()


def _write_temporary(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    """``tensors`` in a new hidden temporary file beside ``path`` (readable like any new file there)."""
    sweep_stale_temporaries(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=dict(metadata))
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only; shared model folders need more
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def save_tensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors`` file written to a temporary name in the same folder, then renamed over ``path``:
    a crash or a full disk never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _write_temporary(tensors, path, dict(metadata or {}))
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
