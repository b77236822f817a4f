"""The WaveFT weight adapter: one adapted layer as a ComfyUI ``WeightAdapterBase`` patch.

ComfyUI keeps a model's patches as objects and asks each for the patched weight only when that weight is
loaded onto its device (``calculate_weight``), or on every forward in low-VRAM mode (``LowVramPatch``). A
WaveFT layer answers with a sparse scatter of its ``p`` wavelet patches straight into the weight it is given:
no dense ``dW``, nothing kept per model, so it is as cheap in low-VRAM mode as at load time.

The class is built by :func:`make_adapter_class` on whatever base class the host has -- ComfyUI's
``comfy.weight_adapter.WeightAdapterBase`` or the vendored copies in reForge / Forge Neo -- so this module
imports no host code, and both glues (``nodes/``, ``webui_ext/``) import it like any core module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

import torch

from .adapter_file import SUFFIXES, AdapterFileError, LayerAdapter, layer_from_tensors
from .comfy_protocol_train import conv_delta, make_train_class, matrix_view
from .names import printable

log = logging.getLogger("WaveFT")
MARKER = "is_waveft_adapter"  # class attribute that identifies our adapter classes in a host's list
# weight-adapter tensors of ComfyUI's other adapter classes (LoRA in its spellings, LoHa, LoKr, GLoRA, OFT,
# BOFT, full diffs): one of them beside WaveFT tensors under the same layer name makes a mixed layer
OTHER_ADAPTER_PARTS = (".lora_up.weight", ".lora_down.weight", "_lora.up.weight", ".lora.up.weight", ".lora_A.weight", ".lora_A",
                       ".lora_A.default.weight",
                       ".lora_B.weight", ".lora_linear_layer.up.weight", ".hada_w1_a", ".hada_w2_a", ".lokr_w1",
                       ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a", ".a1.weight", ".oft_blocks", ".oft_diag", ".boft_blocks",
                       ".diff")
ALGORITHM = "WaveFT"  # its name among the core trainer's algorithms (a saved workflow's value: never rename)


def _is_identity(function: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
    """True if ``function`` is the identity ComfyUI substitutes for ``None`` (the usual case).

    Only then may the update be scattered into the weight; any other function needs the dense ``dW``.
    """
    if function is None:
        return True
    probe = torch.zeros(1)
    try:
        return function(probe) is probe
    except Exception:  # a function that cannot take the probe is certainly not the identity
        return False


class WaveFTAdapterMixin:
    """The behaviour of the WaveFT adapter; :func:`make_adapter_class` puts it on a host's base class.

    Everything the adapter needs lives in ``weights = [coef, layer]``: newer ComfyUI (dynamic VRAM) rebuilds
    every adapter as ``type(v)(v.loaded_keys, moved(v.weights))``, moving the tensors it finds there into a
    staging buffer whose data may arrive only after construction, and its bypass loader replaces ``weights``
    with copies cast to the layer's dtype. So ``coef`` is the one tensor in ``weights`` (the host may move and
    cast it), ``layer`` is a :class:`LayerAdapter` the host passes through untouched (shape, wavelet, scaling,
    seed or explicit integer positions, and the shared patch-geometry cache), and nothing is read at
    construction.
    """

    name = "waveft"
    multiplier = 1.0  # set by newer ComfyUI's bypass mode before it calls h()
    is_waveft_adapter = True

    def __init__(self, loaded_keys: set[str], weights: Sequence[Any]) -> None:
        # duck-typed: tests and A1111 import the core under more than one module name
        if len(weights) != 2 or not hasattr(weights[1], "with_coef"):
            raise TypeError("a WaveFT adapter is built from weights = [coef, LayerAdapter]")
        self.loaded_keys = loaded_keys
        self.weights = weights
        self.shape = weights[1].shape

    @classmethod
    def from_layer(cls, layer: LayerAdapter, loaded_keys: set[str] | None = None) -> WaveFTAdapterMixin:
        return cls(set() if loaded_keys is None else loaded_keys, [layer.coef, layer])

    @property
    def layer(self) -> LayerAdapter:
        """The layer with the coefficients the host holds now (moved, possibly cast: maths in float32)."""
        coef, layer = self.weights[0], self.weights[1]
        return layer if coef is layer.coef else layer.with_coef(coef.to(torch.float32))

    @classmethod
    def load(
        cls,
        x: str,
        lora: Mapping[str, torch.Tensor],
        alpha: float | None = None,
        dora_scale: torch.Tensor | None = None,
        loaded_keys: set[str] | None = None,
    ) -> WaveFTAdapterMixin | None:
        """The adapter for layer prefix ``x`` of a file's tensors ``lora``, or ``None`` if it has none.

        Raises :class:`AdapterFileError` naming the key when the layer's tensors are malformed: a bad file
        must stop the load, never patch a model with garbage.
        """
        if loaded_keys is None:
            loaded_keys = set()
        present = {suffix: f"{x}.{suffix}" for suffix in SUFFIXES if f"{x}.{suffix}" in lora}
        if not present:
            return None
        others = [f"{x}{part}" for part in OTHER_ADAPTER_PARTS if f"{x}{part}" in lora]
        if others:  # ComfyUI would apply only one of them (the last adapter class that matches)
            raise AdapterFileError(f"{printable(x)}: holds WaveFT and other adapter tensors ({', '.join(map(printable, others))}); "
                                   "a mixed layer is refused instead of applying half of it")
        layer = layer_from_tensors(x, {suffix: lora[key] for suffix, key in present.items()})
        loaded_keys.update(present.values())
        return cls.from_layer(layer, loaded_keys)

    def calculate_weight(
        self,
        weight: torch.Tensor,
        key: str,
        strength: float,
        strength_model: float,
        offset: Any,
        function: Callable[[torch.Tensor], torch.Tensor] | None,
        intermediate_dtype: torch.dtype = torch.float32,
        original_weight: Any = None,
    ) -> torch.Tensor:
        """``weight += strength * dW`` in place (ComfyUI has already applied ``strength_model``).

        In place because with an ``offset`` ComfyUI passes a narrowed view and discards the return value.
        """
        if strength == 0:
            return weight
        layer = self.layer
        matrix = matrix_view(weight, layer.shape)
        if matrix is None:
            log.error("[WaveFT] %s: adapter is for a %s weight, the model's is %s; not applied",
                      key, layer.shape, tuple(weight.shape))
            return weight
        if _is_identity(function):
            # sparse scatter; the layer caches its patch geometry per device, so a low-VRAM forward pays
            # for the scatter alone
            layer.add_to_(matrix, float(strength))
        else:
            delta = layer.delta_weight().to(weight.device) * float(strength)
            weight += function(delta.reshape(weight.shape).to(weight.dtype))  # type: ignore[misc]
        return weight

    def calculate_shape(self, key: str) -> None:
        return None  # WaveFT never changes a weight's shape

    def h(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """Bypass mode (newer ComfyUI): the additive output ``multiplier * x dW^T``, from the activations
        (a convolution, which the bypass hook marks ``is_conv``, gets the dense ``dW`` as its kernel)."""
        if getattr(self, "is_conv", False):
            return conv_delta(self, x, self.layer.delta_weight())
        return self.layer.activation_delta(x, float(self.multiplier))

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def bypass_forward(self, org_forward: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any):
        base_out = org_forward(x, *args, **kwargs)
        return self.g(base_out + self.h(x, base_out).to(base_out.dtype))


    @classmethod
    def create_train(cls, weight: torch.Tensor, rank: int = 1, alpha: float = 1.0, *args: Any) -> Any:
        """A trainable layer for ComfyUI's core Train LoRA node: ``rank`` is read as LoRA's parameter count
        at that rank, ``rank * (out + in)`` coefficients (``alpha`` has no WaveFT meaning)."""
        if cls.train_class is None:
            raise NotImplementedError("this host has no trainable weight adapters")
        return cls.train_class.create(weight, int(rank))

    def to_train(self) -> Any:
        """This layer as a trainable module (the core trainer continuing an ``existing_lora``)."""
        if self.train_class is None:
            raise NotImplementedError("this host has no trainable weight adapters")
        return self.train_class(self.layer)

    train_class: type | None = None  # set by make_adapter_class where the host can train adapters


def make_adapter_class(base: type, train_base: type | None = None) -> type:
    """``WaveFTAdapter``: :class:`WaveFTAdapterMixin` on the host's ``WeightAdapterBase`` ``base``, with its
    trainable twin on ``train_base`` (the host's ``WeightAdapterTrainBase``) where there is one."""
    train_class = None if train_base is None else make_train_class(train_base)
    return type("WaveFTAdapter", (WaveFTAdapterMixin, base), {"__module__": __name__, "train_class": train_class})


def register(
    adapters: MutableSequence[type],
    base: type,
    train_base: type | None = None,
    algorithms: MutableMapping[str, type] | None = None,
) -> type:
    """Put one WaveFT adapter class into a host's adapter list (replacing any earlier one); returns it.

    With ``algorithms`` (ComfyUI's ``adapter_maps``, the core trainer's choices) it is offered there as
    ``WaveFT`` too. Idempotent: loading the pack twice, or under two names, leaves a single WaveFT entry.
    """
    adapter_class = make_adapter_class(base, train_base)
    adapters[:] = [a for a in adapters if not getattr(a, MARKER, False)]
    adapters.append(adapter_class)
    if algorithms is not None and adapter_class.train_class is not None:
        algorithms[ALGORITHM] = adapter_class
    return adapter_class


__all__ = ["AdapterFileError", "WaveFTAdapterMixin", "make_adapter_class", "matrix_view", "register"]
