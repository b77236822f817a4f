"""Callbacks shared by A1111, Forge and reForge: the ``<waveft:...>`` alias, infotext paste, X/Y/Z axis.

All three keep A1111's extra-network machinery: the builtin Lora extension registers its
``ExtraNetworkLora`` in its ``on_before_ui`` callback, and ``before_ui`` callbacks run in reverse order, so
ours would run first and find nothing; hence the alias is registered ``on_app_started`` (after the UI is
built, before any prompt is processed; ``extra_networks.initialize()`` clears aliases on UI reload, and the
callbacks are re-registered with the scripts, so it comes back).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ..waveft_core import clear_caches
from .layers import log
from .prompt_tags import TAG, parse_hashes, rewrite_aliases, set_strength

AXIS_LABEL = "WaveFT strength"
XYZ_MODULE_NAMES = ("xyz_grid.py", "xy_grid.py")  # A1111 names a script module after its file


def _networks() -> ModuleType | None:
    """The builtin Lora extension's ``networks`` module (same name in A1111, Forge and reForge)."""
    return sys.modules.get("networks")


def register_alias(*_args: Any) -> bool:
    """``on_app_started``: make ``<waveft:name:m>`` an alias of ``<lora:name:m>``."""
    lora = getattr(_networks(), "extra_network_lora", None)
    if lora is None:
        log.warning("[WaveFT] the builtin Lora extension is not active: <waveft:...> tags are unavailable")
        return False
    from modules import extra_networks

    extra_networks.register_extra_network_alias(lora, TAG)
    return True


def _alias_for_hash(shorthash: str) -> str | None:
    network_on_disk = getattr(_networks(), "available_network_hash_lookup", {}).get(shorthash)
    return network_on_disk.get_alias() if network_on_disk is not None else None


def infotext_pasted(_infotext: str, params: dict) -> None:
    """``on_infotext_pasted``: re-point ``<waveft:old:`` to the current name of the file with that hash."""
    hashes = parse_hashes(params.get("Lora hashes"))
    if hashes and isinstance(params.get("Prompt"), str):
        params["Prompt"] = rewrite_aliases(params["Prompt"], hashes, _alias_for_hash)


def _prompts_of(p: Any) -> list[str]:
    prompts = [p.prompt] if isinstance(p.prompt, str) else list(p.prompt)
    return prompts + [p.hr_prompt] if isinstance(getattr(p, "hr_prompt", None), str) else prompts


def apply_strength(p: Any, x: float, _xs: list) -> None:
    """X/Y/Z ``apply``: every ``<waveft:...>`` tag of the (hires) prompt gets strength ``x``."""
    p.prompt = set_strength(p.prompt, x) if isinstance(p.prompt, str) else [set_strength(s, x) for s in p.prompt]
    if isinstance(getattr(p, "hr_prompt", None), str):
        p.hr_prompt = set_strength(p.hr_prompt, x)


def confirm_strength(p: Any, _xs: list) -> None:
    """X/Y/Z ``confirm``: refuse to plot a strength that no tag would receive."""
    if not any(f"<{TAG}:" in prompt for prompt in _prompts_of(p)):
        raise RuntimeError(f"{AXIS_LABEL}: the prompt has no <{TAG}:name> tag to vary")


def xyz_module(scripts_data: list) -> ModuleType | None:
    """The loaded X/Y/Z plot script module (it is not in ``sys.modules``; A1111 keeps it in scripts_data)."""
    for data in scripts_data:
        if getattr(data.script_class, "__module__", None) in XYZ_MODULE_NAMES and getattr(data, "module", None):
            return data.module
    return None


def add_xyz_axis(xyz: ModuleType | None = None) -> bool:
    """``on_before_ui``: add the "WaveFT strength" axis once (the X/Y/Z script reads its list at UI build)."""
    if xyz is None:
        from modules import scripts

        xyz = xyz_module(scripts.scripts_data)
    if xyz is None or any(option.label == AXIS_LABEL for option in xyz.axis_options):
        return False
    option = xyz.AxisOption(AXIS_LABEL, float, apply_strength, format_value=xyz.format_value_add_label, confirm=confirm_strength)
    xyz.axis_options.append(option)
    return True


def release_caches(sd_model: Any = None) -> None:
    """``on_model_loaded``: WaveFT's shared device caches belonged to the model just replaced."""
    clear_caches()
