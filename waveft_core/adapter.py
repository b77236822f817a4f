"""One adapted layer and how it is applied: :class:`LayerAdapter` (``dW = s * IDWT2(C)`` at its positions),
patched into a weight, evaluated on activations, or built densely. The file format that stores layers is
:mod:`waveft_core.adapter_file`; the maths is :mod:`waveft_core.functional` and the kernel plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import AdapterFileError
from .functional import add_update_, delta_weight
from .geometry import PatchIndex, patch_index, patch_layout
from .layer import waveft_delta
from .plans import seeded_patch_index, shared_plan
from .positions import sample_positions


@dataclass
class LayerAdapter:
    """One adapted layer: ``dW = scaling * IDWT2(C)``, ``C`` holding ``coef`` at the layer's positions."""

    coef: torch.Tensor
    shape: tuple[int, int]
    scaling: float
    wavelet: str
    seed: int | None = None
    positions: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_params(self) -> int:
        return int(self.coef.numel())

    def with_coef(self, coef: torch.Tensor) -> LayerAdapter:
        """This layer with other storage for its coefficients (a host's copy moved to a device or cast).

        The twin shares the geometry caches: they depend on positions, shape and wavelet, never on ``coef``,
        so a host that rebuilds the layer on every forward does not rebuild its patch index.
        """
        twin = replace(self, coef=coef)
        twin._cache = self._cache
        return twin

    def flat_positions(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        assert self.seed is not None
        return sample_positions(self.shape[0], self.shape[1], self.num_params, self.seed)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.coef, self.flat_positions(), self.shape, self.wavelet, self.scaling)

    def add_to_(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``weight += strength * dW`` in place: a sparse scatter of the ``p L^2`` taps (see
        :func:`waveft_core.add_delta_`), or for long filters, whose taps number over half the weight's entries,
        a dense ``dW`` from the separable factors (faster there, and no tap index: coif17's is ~1 GB per SDXL
        layer shape); half precision is summed in float32 and rounded once either way."""
        if tuple(weight.shape) != tuple(self.shape):
            raise AdapterFileError(f"adapter is for a {self.shape} weight, the model's is {tuple(weight.shape)}")
        return add_update_(weight, self.coef, self.flat_positions(), self.wavelet, self.scaling, strength, self.patch_index)

    def patch_index(self, device: torch.device) -> PatchIndex:
        """Scatter geometry on ``device``, shared by all seeded layers of the same shape and budget."""
        if self.positions is None:
            return seeded_patch_index(tuple(self.shape), self.num_params, self.seed, self.wavelet, torch.device(device))
        key = ("patches", torch.device(device))
        if key not in self._cache:
            layout = patch_layout(self.positions.to(device), self.shape, self.wavelet)
            self._cache[key] = patch_index(layout, self.wavelet, device)
        return self._cache[key]

    def activation_delta(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``strength * x dW^T`` from the activations, never forming ``dW`` (bypass-style application)."""
        if x.device not in self._cache:
            self._cache[x.device] = shared_plan(self.flat_positions(), self.shape, self.wavelet, x.device)
        coef = self.coef.to(x.device)
        return waveft_delta(x, coef, self._cache[x.device], self.scaling * float(strength))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.waveft_coef": self.coef.detach().to("cpu", torch.float32).contiguous(),
            f"{prefix}.waveft_shape": torch.tensor(self.shape, dtype=torch.int64),
            f"{prefix}.waveft_scale": torch.tensor(float(self.scaling), dtype=torch.float32),
            f"{prefix}.waveft_wavelet": torch.tensor(list(self.wavelet.encode("ascii")), dtype=torch.uint8),
        }
        if self.positions is not None:
            out[f"{prefix}.waveft_pos"] = self.positions.detach().to("cpu", torch.int64).contiguous()
        else:
            out[f"{prefix}.waveft_seed"] = torch.tensor(int(self.seed), dtype=torch.int64)  # type: ignore[arg-type]
        return out
