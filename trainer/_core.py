"""The one place that imports :mod:`waveft_core`, so the trainer works however the repository is loaded.

Inside the pack (ComfyUI imports the root folder as a package, A1111's shim loads it under a unique name)
``waveft_core`` is a sibling subpackage; with the repository root on ``sys.path`` (pytest,
``python -m trainer``) it is top-level. Every other trainer module imports ``core`` (and ``names``, which
``waveft_core/__init__`` does not import itself) from here, relatively.
"""

try:
    from .. import waveft_core as core  # inside the pack (ComfyUI / A1111)
    from ..waveft_core import names
except ImportError:  # top-level package (pytest, python -m trainer)
    import waveft_core as core
    from waveft_core import names

__all__ = ["core", "names"]
