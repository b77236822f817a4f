"""The training loss curve, drawn with Pillow (which both hosts ship): an RGB ``uint8`` image ``[H, W, 3]``.

Raw losses are drawn light, their bias-corrected exponential moving average dark::

    m_0 = 0,  m_k = a m_{k-1} + (1 - a) l_k,  smoothed_k = m_k / (1 - a^k)

The y axis spans ``[min, max]`` of the finite losses. Axes are labelled "step" and "loss", with the run's
name as the title. ComfyUI's ``IMAGE`` wants ``float [B, H, W, 3]`` in ``[0, 1]``:
``plot_losses(l)[None].float() / 255``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)
RAW = (160, 190, 235)
SMOOTH = (20, 70, 170)
MARGINS = (56, 16, 28, 30)  # left, right, top, bottom: room for tick labels, axis names and the title


def ema(values: Sequence[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (module docstring)."""
    out, mean = [], 0.0
    for k, value in enumerate(values, start=1):
        mean = decay * mean + (1 - decay) * value
        out.append(mean / (1 - decay**k))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (10.1+)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _put(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, font: ImageFont.ImageFont, align: str = "lt") -> None:
    """``text`` with its box aligned at ``(x, y)``: ``align`` = horizontal (l/m/r) + vertical (t/m/b).

    Positioned by hand: Pillow's ``anchor`` works with FreeType fonts only, and A1111 1.10 ships Pillow 9.5,
    whose default font is a bitmap font."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    dx = {"l": 0.0, "m": (x1 - x0) / 2, "r": float(x1 - x0)}[align[0]] + x0
    dy = {"t": 0.0, "m": (y1 - y0) / 2, "b": float(y1 - y0)}[align[1]] + y0
    draw.text((x - dx, y - dy), text, fill=AXIS, font=font)


def plot_losses(
    losses: Sequence[float], width: int = 512, height: int = 256, smoothing: float = 0.9, title: str = ""
) -> torch.Tensor:
    """The loss curve as ``uint8 [height, width, 3]`` (non-finite losses are left out)."""
    if width < 128 or height < 96:
        raise ValueError(f"plot needs at least 128x96 pixels; got {width}x{height}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1); got {smoothing!r}")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(11)
    left, right, top, bottom = MARGINS[0], width - MARGINS[1], MARGINS[2], height - MARGINS[3]
    for k in range(5):  # horizontal grid at quarters
        y = top + (bottom - top) * k / 4
        draw.line([(left, y), (right, y)], fill=GRID)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    _put(draw, "step", left + (right - left) / 2, height - 3, font, "mb")
    _put(draw, "loss", 4, top - 4, font, "lb")
    if title:
        _put(draw, title[:80], width / 2, 4, font, "mt")
    points = [(k, float(v)) for k, v in enumerate(losses) if math.isfinite(float(v))]
    if points:
        values = [v for _, v in points]
        lo, hi = min(values), max(values)
        span = hi - lo if hi > lo else max(abs(hi), 1e-12)
        last = max(1, len(losses) - 1)

        def xy(step: int, value: float) -> tuple[float, float]:
            return left + step / last * (right - left), bottom - (value - lo) / span * (bottom - top)

        steps = [k for k, _ in points]
        draw.line([xy(k, v) for k, v in points], fill=RAW, width=1)
        draw.line([xy(k, v) for k, v in zip(steps, ema(values, smoothing), strict=True)], fill=SMOOTH, width=2)
        _put(draw, f"{hi:.4g}", left - 4, top, font, "rm")
        _put(draw, f"{lo:.4g}", left - 4, bottom, font, "rm")
        _put(draw, "0", left, bottom + 3, font, "lt")
        _put(draw, str(len(losses)), right, bottom + 3, font, "rt")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of an RGB ``uint8 [H, W, 3]`` image."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    height, width, _ = image.shape
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), bytes(image.contiguous().reshape(-1).tolist())).save(buffer, format="PNG")
    return buffer.getvalue()
