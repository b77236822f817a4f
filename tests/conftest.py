"""Shared fixtures (helpers live in ``packs.py``, ``comfy_host.py``, ``oracles.py``, ``trainer_toys.py``). The
repository root is on sys.path (pyproject: pythonpath = ["."]), so ``waveft_core`` and ``trainer`` import as
top-level packages, the way pytest and ``python -m`` see them.
"""

from __future__ import annotations

import logging
from types import ModuleType

import pytest
from packs import load_pack


@pytest.fixture
def pack() -> ModuleType:
    return load_pack()


@pytest.fixture(autouse=True)
def _waveft_logger_restored():
    """The A1111 shim gives the ``WaveFT`` logger a console handler of its own (and stops propagation): undo it
    after each test, so later tests see their output and caplog sees the records."""
    logger = logging.getLogger("WaveFT")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved
