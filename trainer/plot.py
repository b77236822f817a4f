"""A loss curve drawn with torch alone (no matplotlib): an RGB ``uint8`` image ``[H, W, 3]``.

Raw losses are drawn light, their bias-corrected exponential moving average dark::

    m_0 = 0,  m_k = a m_{k-1} + (1 - a) l_k,  smoothed_k = m_k / (1 - a^k)

The y axis spans ``[min, max]`` of the finite losses; the two ends are labelled with a 3x5 pixel font.
ComfyUI's ``IMAGE`` wants ``float [B, H, W, 3]`` in ``[0, 1]``: ``plot_losses(l)[None].float() / 255``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import torch

BACKGROUND = (255, 255, 255)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)
RAW = (160, 190, 235)
SMOOTH = (20, 70, 170)

# 3x5 glyphs, rows top to bottom, 3 bits per row (left = 4)
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0),
}  # fmt: skip


def ema(values: Sequence[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (module docstring)."""
    out, mean = [], 0.0
    for k, value in enumerate(values, start=1):
        mean = decay * mean + (1 - decay) * value
        out.append(mean / (1 - decay**k))
    return out


def polyline_pixels(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixels of the polyline through ``(xs, ys)``: each segment sampled once per pixel of its length."""
    if xs.numel() == 1:
        return xs.round().long(), ys.round().long()
    dx, dy = xs[1:] - xs[:-1], ys[1:] - ys[:-1]
    counts = torch.maximum(dx.abs(), dy.abs()).ceil().long() + 1
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    t = (torch.arange(int(counts.sum())) - first[segment]) / (counts[segment] - 1).clamp(min=1)
    return (xs[segment] + t * dx[segment]).round().long(), (ys[segment] + t * dy[segment]).round().long()


def _paint(
    image: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, color: tuple[int, int, int], radius: int
) -> None:
    height, width, _ = image.shape
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = rows + dr, cols + dc
            keep = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            image[r[keep], c[keep]] = torch.tensor(color, dtype=torch.uint8)


def draw_text(image: torch.Tensor, text: str, row: int, col: int, color: tuple[int, int, int], scale: int = 2) -> None:
    """Write ``text`` (digits, ``.``, ``-``, ``e``) with its top-left corner at ``(row, col)``."""
    for index, char in enumerate(text):
        glyph = _GLYPHS.get(char, _GLYPHS[" "])
        for r, bits in enumerate(glyph):
            for c in range(3):
                if bits & (4 >> c):
                    top, left = row + r * scale, col + (4 * index + c) * scale
                    image[top : top + scale, left : left + scale] = torch.tensor(color, dtype=torch.uint8)


def plot_losses(losses: Sequence[float], width: int = 512, height: int = 256, smoothing: float = 0.9) -> torch.Tensor:
    """The loss curve as ``uint8 [height, width, 3]`` (non-finite losses are left out)."""
    if width < 64 or height < 48:
        raise ValueError(f"plot needs at least 64x48 pixels; got {width}x{height}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1); got {smoothing!r}")
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).expand(height, width, 3).clone()
    left, right, top, bottom = 8, width - 8, 22, height - 22
    for k in range(5):  # horizontal grid at quarters
        image[top + (bottom - top) * k // 4, left:right] = torch.tensor(GRID, dtype=torch.uint8)
    image[top : bottom + 1, left] = torch.tensor(AXIS, dtype=torch.uint8)
    image[bottom, left : right + 1] = torch.tensor(AXIS, dtype=torch.uint8)
    points = [(k, float(v)) for k, v in enumerate(losses) if torch.isfinite(torch.tensor(float(v)))]
    if not points:
        return image
    steps = torch.tensor([k for k, _ in points], dtype=torch.float64)
    values = torch.tensor([v for _, v in points], dtype=torch.float64)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else max(abs(hi), 1e-12)
    xs = left + (steps / max(1, len(losses) - 1)) * (right - left)
    for series, color, radius in ((values, RAW, 0), (torch.tensor(ema(values.tolist(), smoothing)), SMOOTH, 1)):
        ys = bottom - (series - lo) / span * (bottom - top)
        cols, rows = polyline_pixels(xs, ys)
        _paint(image, cols, rows, color, radius)
    draw_text(image, f"{hi:.4g}", 6, left, AXIS)
    draw_text(image, f"{lo:.4g}", bottom + 6, left, AXIS)
    draw_text(image, str(len(losses)), bottom + 6, right - 8 * len(str(len(losses))), AXIS)
    return image


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of an RGB ``uint8 [H, W, 3]`` image (stdlib ``zlib`` only; for the CLI's loss plot)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    height, width, _ = image.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), image.reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    body = zlib.compress(bytes(rows.reshape(-1).tolist()), 6)  # tolist: no numpy dependency
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
