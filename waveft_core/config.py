"""``WaveFTConfig``: every user-facing WaveFT setting, validated in one place, and the budget rules.

Budgets (how many coefficients ``p_i`` each adapted layer gets):

* per layer: ``p_i = n_frequency`` (default 2592, LoRA rank-1's mean on SDXL attention);
* overrides: the first regex in ``n_frequency_pattern`` that matches a layer's name sets its ``p_i``;
* total: ``total_budget = P`` splits ``P`` proportionally to ``out_i * in_i`` (PEFT's proportional rule,
  ``p_i = max(1, round(out_i in_i / sum_j out_j in_j * P))``), then corrects rounding so ``sum p_i = P``
  exactly. Always ``0 < p_i <= out_i * in_i``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .functional import DEFAULT_SCALING, DEFAULT_WAVELET
from .positions import DEFAULT_SEED
from .wavelets import check_wavelet

SDXL_ATTENTION_PATTERN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$"
DEFAULT_N_FREQUENCY = 2592


@dataclass
class WaveFTConfig:
    """Settings of one WaveFT adapter (see the module docstring for the budget rules).

    ``target_pattern`` is a regex searched in each ``nn.Linear``'s qualified module name; the default picks
    the paper's SDXL attention projections (``to_q, to_k, to_v, to_out.0``) in diffusers or ldm naming.
    """

    n_frequency: int = DEFAULT_N_FREQUENCY
    scaling: float = DEFAULT_SCALING
    wavelet: str = DEFAULT_WAVELET
    seed: int = DEFAULT_SEED
    target_pattern: str = SDXL_ATTENTION_PATTERN
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    total_budget: int | None = None

    def __post_init__(self) -> None:
        check_wavelet(self.wavelet)
        if not isinstance(self.n_frequency, int) or self.n_frequency <= 0:
            raise ValueError(f"n_frequency must be a positive integer, got {self.n_frequency!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling) or self.scaling == 0:
            raise ValueError(f"scaling must be a non-zero finite number, got {self.scaling!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.total_budget is not None and (not isinstance(self.total_budget, int) or self.total_budget <= 0):
            raise ValueError(f"total_budget must be None or a positive integer, got {self.total_budget!r}")
        for pattern in (self.target_pattern, *self.n_frequency_pattern):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid regular expression {pattern!r}: {err}") from err
        for pattern, value in self.n_frequency_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"n_frequency_pattern[{pattern!r}] must be a positive integer, got {value!r}")

    def targets(self, name: str) -> bool:
        return re.search(self.target_pattern, name) is not None

    def budgets(self, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        """``p_i`` for every layer name in ``shapes`` (name -> (out, in)); raises if a budget cannot fit."""
        if not shapes:
            raise ValueError(f"no layer matches target_pattern {self.target_pattern!r}")
        if self.total_budget is not None:
            return proportional_budgets(shapes, self.total_budget)
        budgets = {}
        for name, (out_features, in_features) in shapes.items():
            p = next((v for pat, v in self.n_frequency_pattern.items() if re.search(pat, name)), self.n_frequency)
            if p > out_features * in_features:
                raise ValueError(f"{name}: budget {p} exceeds the {out_features}x{in_features} weight's size")
            budgets[name] = p
        return budgets


def proportional_budgets(shapes: dict[str, tuple[int, int]], total: int) -> dict[str, int]:
    """Split exactly ``total`` coefficients over layers proportionally to ``out * in`` (largest remainder)."""
    sizes = {name: out_features * in_features for name, (out_features, in_features) in shapes.items()}
    if total < len(sizes):
        raise ValueError(f"total_budget {total} is smaller than the number of adapted layers ({len(sizes)})")
    if total > sum(sizes.values()):
        raise ValueError(f"total_budget {total} exceeds the {sum(sizes.values())} weights of the adapted layers")
    grand = sum(sizes.values())
    exact = {name: size / grand * total for name, size in sizes.items()}
    budgets = {name: min(sizes[name], max(1, int(share))) for name, share in exact.items()}
    order: Sequence[str] = sorted(exact, key=lambda n: exact[n] - int(exact[n]), reverse=True)
    step = 1 if sum(budgets.values()) < total else -1
    while sum(budgets.values()) != total:
        for name in order:
            if sum(budgets.values()) == total:
                break
            candidate = budgets[name] + step
            if 1 <= candidate <= sizes[name]:
                budgets[name] = candidate
    return budgets
