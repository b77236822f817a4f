"""The project's error type for bad adapter files and layers."""

from __future__ import annotations

from .names import printable


class AdapterFileError(ValueError):
    """A WaveFT file or layer is malformed; the message names the file and key (control characters from
    the file escaped, so a hostile name cannot forge a log line or reach a terminal)."""

    def __init__(self, message: object) -> None:
        super().__init__(printable(message))
