"""Attach WaveFT to the ``nn.Linear`` layers of any model, read the trained layers back, and detach.

Attaching swaps each targeted ``nn.Linear`` for a :class:`WaveFTLinear` that wraps it (the base layer and
its weights are the very same objects, frozen); detaching puts the original ``nn.Linear`` back, so the model
is exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_file import LayerAdapter
from .config import WaveFTConfig
from .layer import WaveFTLinear


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def target_linears(model: nn.Module, config: WaveFTConfig) -> dict[str, nn.Linear]:
    """Qualified names and modules of the ``nn.Linear`` layers that ``config.target_pattern`` selects."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, WaveFTLinear) and config.targets(name)
    }


def attach_waveft(model: nn.Module, config: WaveFTConfig) -> dict[str, WaveFTLinear]:
    """Wrap every targeted Linear in ``model`` with a zero-initialised :class:`WaveFTLinear` (in place).

    Returns the new layers by qualified name. Raises ``ValueError`` (leaving ``model`` untouched) if nothing
    matches or a budget does not fit.
    """
    linears = target_linears(model, config)
    shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()}
    budgets = config.budgets(shapes)
    layers = {
        name: WaveFTLinear(linear, budgets[name], config.wavelet, config.scaling, config.seed)
        for name, linear in linears.items()
    }
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    return layers


def detach_waveft(model: nn.Module) -> int:
    """Replace every :class:`WaveFTLinear` in ``model`` by its base Linear; returns how many were removed."""
    names = [name for name, module in model.named_modules() if isinstance(module, WaveFTLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).base)
    return len(names)


def waveft_layers(model: nn.Module) -> dict[str, WaveFTLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WaveFTLinear)}


def export_layer(layer: WaveFTLinear) -> LayerAdapter:
    """One trained layer as a file-ready :class:`LayerAdapter` (positions stored as the seed when they are the
    seed's, else explicitly)."""
    return LayerAdapter(
        coef=layer.coef.detach().to("cpu", torch.float32).clone(),
        shape=layer.shape,
        scaling=layer.scaling,
        wavelet=layer.wavelet,
        seed=layer.seed,
        positions=None if _positions_from_seed(layer) else layer.positions.clone(),
    )


def export_layers(model: nn.Module) -> dict[str, LayerAdapter]:
    """The trained layers of ``model`` as file-ready :class:`LayerAdapter` objects, keyed by module name."""
    return {name: export_layer(layer) for name, layer in waveft_layers(model).items()}


def _positions_from_seed(layer: WaveFTLinear) -> bool:
    from .positions import sample_positions

    out_features, in_features = layer.shape
    expected = sample_positions(out_features, in_features, layer.coef.numel(), layer.seed)
    return torch.equal(expected, layer.positions.cpu())


def set_strength(model: nn.Module, strength: float) -> None:
    for layer in waveft_layers(model).values():
        layer.strength = float(strength)
