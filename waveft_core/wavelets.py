"""Wavelet filter banks and the padded coefficient-grid geometry of WaveFT.

Filters come from PyWavelets (the field's reference implementation), so every discrete orthogonal wavelet it
ships is available with correct taps -- including the ones PEFT's hand-copied table gets wrong (coif4, coif5)
or rejects (haar, db11+, sym11+, coif6+).

Geometry (PEFT's WaveFT, for a weight of shape ``out x in`` and a filter of length ``L``)::

    red = L - 2
    H = out + red, W = in + red, each rounded up to even;  H2, W2 = H // 2, W // 2
    grid C (H x W) holds the coefficients at (row + (H - out) // 2, col + (W - in) // 2)
    C = [[cA, cH], [cV, cD]]  (quadrants of size H2 x W2)
    dW = s * crop(IDWT2(cA, (cH, cV, cD)))   (zero boundary, first ``out`` rows / ``in`` columns kept)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pywt
import torch

_FAMILIES = ("haar", "db", "sym", "coif", "dmey")


@functools.cache
def supported_wavelets() -> tuple[str, ...]:
    """All discrete orthogonal wavelets PyWavelets knows (haar, db1-db38, sym2-sym20, coif1-coif17, dmey)."""
    names: list[str] = []
    for family in _FAMILIES:
        names.extend(pywt.wavelist(family))
    return tuple(names)


def check_wavelet(name: str) -> str:
    """Return ``name`` if it is a supported wavelet, else raise ``ValueError`` listing what is allowed."""
    if not isinstance(name, str) or name not in supported_wavelets():
        raise ValueError(
            f"unknown wavelet {name!r}: allowed are haar, db1-db38, sym2-sym20, coif1-coif17 and dmey "
            "(the discrete orthogonal wavelets of PyWavelets)"
        )
    return name


@functools.cache
def _filters_float64(name: str) -> torch.Tensor:
    wavelet = pywt.Wavelet(check_wavelet(name))
    return torch.tensor([wavelet.rec_lo, wavelet.rec_hi], dtype=torch.float64)


def synthesis_filters(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Reconstruction filters ``[[rec_lo], [rec_hi]]`` as a float32 tensor of shape ``[2, L]``."""
    return _filters_float64(name).to(torch.float32).to(device)  # MPS has no float64: convert on the CPU


def filter_length(name: str) -> int:
    """Length ``L`` of the wavelet's reconstruction filters (2 for haar/db1)."""
    return int(_filters_float64(name).shape[1])


@dataclass(frozen=True)
class GridGeometry:
    """Where the coefficient grid of an ``out x in`` weight sits, for a filter of length ``L``.

    ``pad_rows``/``pad_cols`` are the offsets of the weight inside the padded grid; ``half_rows``/``half_cols``
    are ``H2``/``W2``; ``shift = L - 2`` is how far the reconstruction is cropped on the leading side.
    """

    out_features: int
    in_features: int
    filter_len: int
    half_rows: int
    half_cols: int
    pad_rows: int
    pad_cols: int

    @property
    def shift(self) -> int:
        return self.filter_len - 2


@functools.lru_cache(maxsize=4096)
def grid_geometry(out_features: int, in_features: int, wavelet: str) -> GridGeometry:
    """Padded grid of PEFT's WaveFT: ``H = out + L - 2`` (rounded up to even), likewise ``W``."""
    length = filter_length(wavelet)
    rows = out_features + length - 2
    cols = in_features + length - 2
    rows += rows % 2
    cols += cols % 2
    return GridGeometry(
        out_features=out_features,
        in_features=in_features,
        filter_len=length,
        half_rows=rows // 2,
        half_cols=cols // 2,
        pad_rows=(rows - out_features) // 2,
        pad_cols=(cols - in_features) // 2,
    )
