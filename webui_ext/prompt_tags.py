"""Pure helpers for ``<waveft:name:...>`` prompt tags: set their strength, re-point them after a rename.

A1111 writes the prompt into the image's infotext with the tags as typed, plus ``Lora hashes: name: hash``
for every network it loaded (extra_networks_lora.py). Its paste handler re-points ``<lora:name:`` tags whose
file was renamed, through the hash; :func:`rewrite_aliases` does the same for ``<waveft:name:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

TAG = "waveft"
_TAG_RE = re.compile(r"<" + TAG + r":([^>]+)>")
_NAME_RE = re.compile(r"<" + TAG + r":([^:>]+):")


def _format_number(value: float) -> str:
    return f"{value:g}"


def set_strength(prompt: str, strength: float) -> str:
    """Every ``<waveft:name[:m[:u]][:te=..][:unet=..]>`` tag gets ``strength`` as its (te and unet) multiplier.

    Positional multipliers are replaced by the single one; named ``te=``/``unet=`` arguments are dropped too,
    so the plotted value really is the strength applied everywhere; ``dyn=`` is kept.
    """

    def replace(match: re.Match) -> str:
        name, *args = match.group(1).split(":")
        kept = [arg for arg in args if arg.startswith("dyn=")]
        return "<" + ":".join([TAG, name, _format_number(strength), *kept]) + ">"

    return _TAG_RE.sub(replace, prompt)


def parse_hashes(field: str | None) -> dict[str, str]:
    """``"a: 0123abcd, b: 4567ef01"`` (the infotext's ``Lora hashes``) -> ``{"a": "0123abcd", ...}``."""
    if not field:
        return {}
    pairs = (item.strip().split(":", 1) for item in field.split(","))
    return {name.strip(): value.strip() for name, value in (pair for pair in pairs if len(pair) == 2)}


def rewrite_aliases(prompt: str, hashes: dict[str, str], alias_for_hash: Callable[[str], str | None]) -> str:
    """Re-point ``<waveft:old:`` to the name the file with the recorded hash has now (if it is known)."""

    def replace(match: re.Match) -> str:
        shorthash = hashes.get(match.group(1))
        alias = alias_for_hash(shorthash) if shorthash else None
        return f"<{TAG}:{alias}:" if alias else match.group(0)

    return _NAME_RE.sub(replace, prompt)
