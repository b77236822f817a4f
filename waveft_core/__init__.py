"""waveft_core: Wavelet Fine-Tuning (WaveFT, arXiv 2505.12532) in pure torch, bit-compatible with PEFT.

Public API (everything the hosts' glue and the trainer may call):

* maths: :func:`sample_positions`, :func:`delta_weight`, :func:`add_delta_`, :func:`with_delta`,
  :func:`supported_wavelets`;
* modules: :class:`WaveFTLinear`, :func:`attach_waveft`, :func:`detach_waveft`, :func:`export_layers`;
* settings: :class:`WaveFTConfig`, :func:`proportional_budgets`;
* layers and files: :class:`LayerAdapter`, :class:`AdapterFile`, :func:`save_adapter`, :func:`load_adapter`,
  :func:`layer_from_tensors`, :class:`AdapterFileError`;
* names: :mod:`waveft_core.names` (SDXL ldm / diffusers / kohya spellings).

This package imports no host code (ComfyUI, A1111, gradio); a test enforces it.
"""

from . import names
from .adapter_file import (
    FORMAT_VERSION,
    MAX_UPDATE,
    SUFFIXES,
    AdapterFile,
    AdapterFileError,
    LayerAdapter,
    layer_from_tensors,
    load_adapter,
    save_adapter,
    save_adapter_new,
    save_tensors_atomic,
)
from .config import SDXL_ATTENTION_PATTERN, WaveFTConfig, proportional_budgets
from .functional import DEFAULT_SCALING, DEFAULT_WAVELET, add_delta_, delta_weight, with_delta
from .geometry import patch_layout
from .layer import WaveFTLinear, waveft_delta, waveft_linear
from .model import attach_waveft, detach_waveft, export_layer, export_layers, set_strength, waveft_layers
from .plans import clear_caches
from .positions import DEFAULT_SEED, sample_positions
from .sparse_ops import SparsePlan, build_plan
from .wavelets import check_wavelet, filter_length, supported_wavelets

__all__ = [
    "names",
    "FORMAT_VERSION",
    "MAX_UPDATE",
    "SUFFIXES",
    "AdapterFile",
    "AdapterFileError",
    "LayerAdapter",
    "layer_from_tensors",
    "load_adapter",
    "save_adapter",
    "save_adapter_new",
    "save_tensors_atomic",
    "SDXL_ATTENTION_PATTERN",
    "WaveFTConfig",
    "proportional_budgets",
    "DEFAULT_SCALING",
    "DEFAULT_WAVELET",
    "DEFAULT_SEED",
    "add_delta_",
    "delta_weight",
    "patch_layout",
    "with_delta",
    "WaveFTLinear",
    "waveft_delta",
    "waveft_linear",
    "attach_waveft",
    "detach_waveft",
    "export_layer",
    "export_layers",
    "set_strength",
    "waveft_layers",
    "sample_positions",
    "clear_caches",
    "SparsePlan",
    "build_plan",
    "check_wavelet",
    "filter_length",
    "supported_wavelets",
]
