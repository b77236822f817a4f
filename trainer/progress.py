"""A dependency-free text progress bar for the CLI (hosts map ``progress(step, total, loss)`` to their own)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_bar(step: int, total: int, loss: float, rate: float, elapsed: float, width: int = 30) -> str:
    """``[=====>    ]  12/500  loss 0.1234  3.10 it/s  elapsed 0:04  eta 2:37``, with ``eta = (total - step) / rate``."""
    fraction = min(1.0, step / total) if total else 1.0
    filled = int(fraction * width)
    bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
    eta = (total - step) / rate if rate > 0 else 0.0
    digits = len(str(total))
    return (
        f"[{bar}] {step:>{digits}}/{total}  loss {loss:.4f}  {rate:.2f} it/s  "
        f"elapsed {format_duration(elapsed)}  eta {format_duration(eta)}"
    )


class TextProgress:
    """``progress(step, total, loss)`` callback drawing one self-overwriting line (``\\r``) on ``stream``.

    Redraws at most every ``min_interval`` seconds (and always at the last step, which ends the line), so a
    fast loop does not flood a terminal or a log file.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30, min_interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width, self.min_interval = width, min_interval
        self.start = time.monotonic()
        self.first_step: int | None = None
        self.last_draw = 0.0

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if self.first_step is None:  # a resumed run starts counting at its first new step
            self.first_step = step - 1
        if step < total and now - self.last_draw < self.min_interval:
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0  # this session's steps only
        line = render_bar(step, total, loss, rate, elapsed, self.width)
        self.stream.write("\r" + line + ("\n" if step >= total else ""))
        self.stream.flush()
