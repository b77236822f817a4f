"""``TrainSettings``: every training knob, validated once, with the paper's SDXL defaults.

Paper defaults (WaveFT, arXiv 2505.12532, SDXL personalisation): ``p = 2592`` coefficients per attention
projection, scaling 25, ``db1``, position seed 777; AdamW with ``lr = 1e-4`` and weight decay ``1e-4``,
constant schedule, gradient clipping at 1.0, batch 1 x gradient accumulation 4, 500 steps, 1024 px, bf16.
The noise schedule is SDXL's DDPM "scaled linear" one: ``beta_t = (sqrt(b0) + t/(T-1) (sqrt(b1) - sqrt(b0)))^2``
with ``b0 = 0.00085``, ``b1 = 0.012``, ``T = 1000``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._core import core

SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "no")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_INSTANCE_PROMPT = "a photo of zjw dog"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _number(name: str, value: Any, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}; got {value!r}")


@dataclass
class TrainSettings:
    """How to train (the data and the model come separately). Invalid values raise ``ValueError``.

    * ``steps``: optimiser steps; each consumes ``batch_size * grad_accum`` samples.
    * ``lr_scheduler``: after ``warmup_steps`` of linear warm-up (``lr * (s+1)/warmup``), ``"constant"``
      keeps ``lr``, ``"linear"`` decays to 0 at ``steps``, ``"cosine"`` follows ``lr * (1 + cos(pi u)) / 2``.
    * ``mixed_precision``: ``"auto"`` is ``"bf16"`` on CUDA and ``"no"`` elsewhere; ``"fp16"`` uses loss
      scaling (``torch.amp.GradScaler``). Coefficients and optimiser state stay float32 whatever the choice.
    * ``noise_offset``: ``eps += noise_offset * n``, ``n ~ N(0, 1)`` per sample and channel.
    * ``min_snr_gamma``: weight each sample's loss by ``min(SNR_t, gamma) / SNR_t`` (epsilon) or
      ``min(SNR_t, gamma) / (SNR_t + 1)`` (v-prediction), ``SNR_t = abar_t / (1 - abar_t)``; ``None`` = off.
    * ``timestep_range``: timesteps are drawn uniformly from ``[lo, hi)``.
    * ``save_every``: write the adapter and the resume state every N steps (0: only at the end).
    * ``seed``: the training randomness (batch order, noise, timesteps); the coefficient positions use
      ``waveft.seed``.
    * ``resolution`` and ``base_model_name`` are recorded in the file; hosts encode images at ``resolution``.
    """

    steps: int = 500
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 4
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    prediction_type: str = "epsilon"
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    timestep_range: tuple[int, int] = (0, 1000)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    seed: int = 777
    save_every: int = 0
    resolution: int = 1024
    base_model_name: str = ""
    output_name: str = ""
    waveft: core.WaveFTConfig = field(default_factory=core.WaveFTConfig)

    def __post_init__(self) -> None:
        self.timestep_range = tuple(self.timestep_range)  # type: ignore[assignment]  (JSON gives lists)
        if isinstance(self.waveft, dict):
            self.waveft = core.WaveFTConfig(**self.waveft)
        _integer("steps", self.steps, 1)
        _number("learning_rate", self.learning_rate, 0.0, strict=True)
        _number("weight_decay", self.weight_decay, 0.0, strict=False)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _integer("warmup_steps", self.warmup_steps, 0)
        _integer("batch_size", self.batch_size, 1)
        _integer("grad_accum", self.grad_accum, 1)
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, 0.0, strict=True)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _number("noise_offset", self.noise_offset, 0.0, strict=False)
        if self.min_snr_gamma is not None:
            _number("min_snr_gamma", self.min_snr_gamma, 0.0, strict=True)
        _integer("num_train_timesteps", self.num_train_timesteps, 2)
        _number("beta_start", self.beta_start, 0.0, strict=True)
        _number("beta_end", self.beta_end, self.beta_start, strict=True)
        if self.beta_end >= 1:
            raise ValueError(f"beta_end must be < 1; got {self.beta_end!r}")
        if not isinstance(self.zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be True or False; got {self.zero_terminal_snr!r}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":  # eps is undefined at pure noise
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction' (the last step is pure noise)")
        self._check_timestep_range()
        _integer("seed", self.seed, 0)
        _integer("save_every", self.save_every, 0)
        _integer("resolution", self.resolution, 8)
        if not isinstance(self.waveft, core.WaveFTConfig):
            raise ValueError(f"waveft must be a WaveFTConfig; got {type(self.waveft).__name__}")

    def _check_timestep_range(self) -> None:
        lo_hi = self.timestep_range
        if len(lo_hi) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in lo_hi):
            raise ValueError(f"timestep_range must be two integers (lo, hi); got {lo_hi!r}")
        lo, hi = lo_hi
        if not 0 <= lo < hi <= self.num_train_timesteps:
            raise ValueError(
                f"timestep_range must satisfy 0 <= lo < hi <= num_train_timesteps={self.num_train_timesteps};"
                f" got {lo_hi!r}"
            )

    def precision(self, device: torch.device, model_dtype: torch.dtype | None = None) -> str:
        """The effective mixed precision on ``device`` (resolves ``"auto"``).

        ``"auto"``: none on CPU; on a GPU the model's own half type if it has one (an fp16 UNet autocast to
        bf16 would be cast back and forth), else bf16 where the card has it natively, else fp16.
        """
        if self.mixed_precision != "auto":
            return self.mixed_precision
        device = torch.device(device)
        own = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype)  # type: ignore[arg-type]
        if device.type == "cpu":
            return "no"
        if device.type == "cuda":
            return own or ("bf16" if _native_bf16() else "fp16")  # pre-Ampere cards (T4, 20xx, 10xx): fp16
        # other accelerators (Apple's MPS, Intel's XPU): an fp16 model needs loss scaling, which only newer
        # torch does there (MPS: autocast from 2.5, loss scaling from 2025); bf16 and float32 need none
        return "fp16" if own == "fp16" and scaled_fp16_works(device) else "no"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the inverse is ``TrainSettings(**d)``)."""
        out = asdict(self)
        out["timestep_range"] = list(self.timestep_range)
        return out

    def trajectory_dict(
        self, device: torch.device | str = "cpu", model_dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one.

        Saving, naming and (for a constant schedule, whose learning rate does not depend on it) ``steps`` may
        change between runs, so training can be extended; ``"auto"`` precision is resolved for ``device``.
        """
        out = self.to_dict()
        for key in ("save_every", "base_model_name", "output_name", "resolution"):
            out.pop(key)
        if not self.zero_terminal_snr:  # states saved before the option existed had the default schedule
            out.pop("zero_terminal_snr")
        if self.lr_scheduler == "constant":
            out.pop("steps")
        out["mixed_precision"] = self.precision(torch.device(device), model_dtype)
        return out


@functools.cache
def scaled_fp16_works(device: torch.device) -> bool:
    """Whether fp16 autocast plus ``torch.amp.GradScaler`` train correctly on ``device`` with this torch:
    one scaled SGD step on a float32 parameter (what the coefficients are) must give the unscaled update."""
    try:
        param = torch.zeros(2, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([param], lr=0.5)
        scaler = torch.amp.GradScaler(device.type)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = (param * torch.tensor([1.0, 2.0], device=device)).sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return bool(torch.allclose(param.detach().cpu(), torch.tensor([-0.5, -1.0])))
    except Exception:  # a device or torch without these kernels raises in many ways (TypeError on MPS < 2025)
        return False


def _native_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 natively (emulated bf16 is slow, torch 2.1 refuses it)."""
    if not torch.cuda.is_available():  # nothing to ask (settings resolved for a device this machine lacks)
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4 has no including_emulation, and counts no emulation anyway
        return bool(torch.cuda.is_bf16_supported())


# what the hosts' training UIs start from (ComfyUI's WaveFT Train, A1111's tab): one source, the engine's and
# the method's own defaults, plus the hosts' checkpoint interval (a crash costs at most that many steps)
HOST_SAVE_EVERY = 50
UI_DEFAULTS: dict[str, object] = {
    "instance_prompt": DEFAULT_INSTANCE_PROMPT,
    "budget": core.WaveFTConfig().n_frequency,
    "wavelet": core.WaveFTConfig().wavelet,
    "scaling": core.WaveFTConfig().scaling,
    "steps": TrainSettings.steps,
    "learning_rate": TrainSettings.learning_rate,
    "seed": TrainSettings.seed,
    "resolution": TrainSettings.resolution,
    "save_every": HOST_SAVE_EVERY,
}
