"""A1111 / Forge / reForge glue of WaveFT (loaded by ``scripts/waveft_a1111.py`` under a unique package name).

:func:`setup` runs each time the host (re)loads its scripts: it detects the host, hooks WaveFT into that
host's own LoRA loader (idempotently: the host modules survive a UI reload, our callbacks do not), and
registers the callbacks. Inside a host nothing here raises: an unsupported host or a failed hook is one log
line, never a traceback that stops the UI.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

from .host import Host, detect_host
from .layers import log


def _register_a1111(networks: ModuleType) -> None:
    from . import network_waveft  # imports the builtin Lora extension's ``network``: A1111 only

    types = networks.module_types
    types[:] = [t for t in types if type(t).__name__ != network_waveft.ModuleTypeWaveFT.__name__]
    types.append(network_waveft.ModuleTypeWaveFT())
    log.info("[WaveFT] A1111: WaveFT files load through <lora:...> and <waveft:...>")


def install_loader(host: Host) -> bool:
    """Hook WaveFT into the host's LoRA loading; ``False`` (after one log line) if that is not possible."""
    if host.hook is None:
        log.warning("[WaveFT] WaveFT files cannot be applied on this host: %s", host.reason)
        return False
    if host.kind == "a1111":
        _register_a1111(host.hook)
        return True
    if host.kind == "forge":
        from . import forge

        forge.register(host.hook)
        return True
    from . import comfy_style

    return comfy_style.register(host.hook, host.kind)


def register_callbacks(host: Host) -> None:
    """Prompt alias, infotext paste and X/Y/Z axis everywhere; the training tab on A1111 (its model layout)."""
    from modules import script_callbacks

    from . import callbacks

    script_callbacks.on_app_started(callbacks.register_alias)
    script_callbacks.on_infotext_pasted(callbacks.infotext_pasted)
    script_callbacks.on_before_ui(callbacks.add_xyz_axis)
    script_callbacks.on_model_loaded(callbacks.release_caches)  # the previous model is gone
    if host.kind != "a1111":
        log.info("[WaveFT] the WaveFT Train tab needs A1111's model layout; not shown on %s", host.kind)
        return
    try:
        from . import train_tab
    except Exception as err:  # the loader hooks above still work without the tab
        log.error("[WaveFT] the WaveFT Train tab is unavailable (%s: %s)", type(err).__name__, err)
        return
    script_callbacks.on_ui_tabs(train_tab.create_tab)


def console_logging() -> None:
    """Our lines on the WebUI's console, once each: A1111 configures no logging unless started with
    ``--loglevel`` (INFO lines were lost), and with it prefixes the logger's name to messages that already say
    ``[WaveFT]``. So the ``WaveFT`` logger gets a console handler of its own and does not propagate."""
    if any(getattr(handler, "waveft_console", False) for handler in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.waveft_console = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def setup() -> Host:
    """Entry point for the A1111 script shim; safe to call outside any host (it only logs)."""
    host = detect_host()
    try:
        install_loader(host)
    except Exception as err:  # a host change we do not know must not stop the UI from starting
        log.error("[WaveFT] could not hook into %s (%s: %s); WaveFT files will not apply", host.kind, type(err).__name__, err)
    try:
        register_callbacks(host)
    except ImportError as err:
        log.warning("[WaveFT] not running inside A1111/Forge (%s); nothing registered", err)
    except Exception as err:
        log.error("[WaveFT] could not register callbacks (%s: %s)", type(err).__name__, err)
    return host
