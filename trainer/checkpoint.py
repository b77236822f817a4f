"""What a run writes: the adapter (format v1, with training metadata) and a resumable state file.

For an output ``name.safetensors`` the state lives beside it in ``name.waveft-state`` (a safetensors file,
deliberately not named ``*.safetensors`` so that hosts do not list it as an adapter). It holds, per adapted
module, the coefficients and AdamW's two moments, plus a JSON string (in the safetensors metadata) with the
step count, every AdamW step counter, the loss history, the fp16 loss-scaler state and a fingerprint of the
settings and the data. No pickle anywhere. Both files are written atomically (temporary file + rename); the
state is self-sufficient, so an adapter and a state written by different steps cannot mix on resume.

The batch order and the noise are pure functions of ``(seed, step)`` (see :mod:`trainer.data`), so the step
count *is* the random-generator state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ._core import core

STATE_VERSION = "1"
STATE_SUFFIX = ".waveft-state"
_KINDS = ("coef", "exp_avg", "exp_avg_sq")


def state_path(output_path: str | os.PathLike) -> Path:
    """``name.waveft-state`` beside the adapter ``name.safetensors``."""
    path = Path(output_path)
    return path.with_name(path.stem + STATE_SUFFIX)


@dataclass
class TrainState:
    """The JSON part of a resume state: completed steps, losses and what must match to resume."""

    step: int
    losses: list[float]
    fingerprint: dict[str, Any]
    scaler: dict[str, Any] | None = None
    adam_steps: dict[str, float] = field(default_factory=dict)


def run_key(
    settings: Any, data: Any, weights: Iterable[torch.Tensor], device: torch.device, input_dtype: torch.dtype
) -> str:
    """A 16-hex-digit name for one training run, for a host to find the run's checkpoint again.

    It hashes what the result depends on: the settings that shape the trajectory (not ``steps`` of a
    constant schedule, so a longer run continues a shorter one), the latents and the conditioning values,
    and checksums of ``weights`` (the adapted layers' base weights: another checkpoint or a LoRA merged
    before training gives another key). The same run gives the same key in a new process.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps([settings.trajectory_dict(device, input_dtype), data.fingerprint()], sort_keys=True).encode())
    for cond in data.conds:
        for key in sorted(cond):
            digest.update(key.encode() + _checksum(cond[key]))
    for weight in weights:
        digest.update(_checksum(weight))
    return digest.hexdigest()


def _checksum(tensor: torch.Tensor) -> bytes:
    # sums in float32 (MPS has no float64), printed to 7 digits: stable across processes on one device
    values = tensor.detach().float()
    return f"{tuple(tensor.shape)}:{float(values.sum()):.6e}:{float(values.square().sum()):.6e}".encode()


def save_state(
    path: str | os.PathLike,
    layers: Mapping[str, core.WaveFTLinear],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
) -> Path:
    """Write coefficients, AdamW moments and ``state`` to ``path`` atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    adam_steps: dict[str, float] = {}
    for name, layer in layers.items():
        tensors[f"coef/{name}"] = layer.coef.detach().to("cpu", torch.float32).contiguous()
        moments = optimizer.state.get(layer.coef, {})
        if "exp_avg" in moments:
            tensors[f"exp_avg/{name}"] = moments["exp_avg"].detach().to("cpu", torch.float32).contiguous()
            tensors[f"exp_avg_sq/{name}"] = moments["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous()
            adam_steps[name] = float(moments["step"])
    info = {
        "version": STATE_VERSION,
        "step": state.step,
        "losses": state.losses,
        "fingerprint": state.fingerprint,
        "scaler": state.scaler,
        "adam_steps": adam_steps,
    }
    core.save_tensors_atomic(tensors, path, {"waveft_train_state": json.dumps(info)})
    return path


def saved_steps(path: str | os.PathLike) -> int | None:
    """The completed steps a state file records, read from its header only; ``None`` if it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(json.loads((handle.metadata() or {})["waveft_train_state"])["step"])
    except Exception:  # missing, truncated or foreign files all mean "no usable state"
        return None


def read_state(path: str | os.PathLike) -> tuple[TrainState, dict[str, dict[str, torch.Tensor]]]:
    """Parse a state file: the JSON part and ``{kind: {module name: tensor}}``. Raises ``ValueError``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("waveft_train_state")
            tensors: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
            for key in handle.keys():
                kind, _, name = key.partition("/")
                if kind not in tensors:
                    raise ValueError(f"unexpected tensor {key!r}")
                tensors[kind][name] = handle.get_tensor(key)
        info = json.loads(raw) if raw else None
    except Exception as err:  # safetensors and json raise their own types; all mean 'unreadable'
        raise ValueError(f"{path.name}: not a readable WaveFT training state ({err})") from None
    if not isinstance(info, dict) or info.get("version") != STATE_VERSION:
        raise ValueError(f"{path.name}: not a WaveFT training state of version {STATE_VERSION}")
    try:
        state = TrainState(
            step=int(info["step"]),
            losses=[float(v) for v in info["losses"]],
            fingerprint=info["fingerprint"],
            scaler=info.get("scaler"),
            adam_steps={str(k): float(v) for k, v in dict(info.get("adam_steps", {})).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a tampered or truncated header
        raise ValueError(f"{path.name}: damaged training state ({type(err).__name__}: {err})") from None
    if state.step < 0 or any(not (v >= 1 and v == int(v)) for v in state.adam_steps.values()):
        raise ValueError(f"{path.name}: damaged training state (negative or fractional step counts)")
    if len(state.losses) != state.step:
        raise ValueError(f"{path.name}: {len(state.losses)} losses recorded for {state.step} steps")
    return state, tensors


def restore_state(
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: TrainState,
    layers: Mapping[str, core.WaveFTLinear],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Put saved coefficients and AdamW moments into ``layers`` / ``optimizer`` (checked against them)."""
    if set(tensors["coef"]) != set(layers):
        missing, extra = sorted(set(layers) - set(tensors["coef"])), sorted(set(tensors["coef"]) - set(layers))
        raise ValueError(f"resume state is for other layers (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, layer in layers.items():
        saved = tensors["coef"][name]
        if saved.shape != layer.coef.shape or not torch.isfinite(saved).all():
            raise ValueError(f"resume state: coef/{name} has shape {tuple(saved.shape)} or is not finite")
        with torch.no_grad():
            layer.coef.copy_(saved)
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, step in state.adam_steps.items():
        coef = layers[name].coef
        avg, avg_sq = tensors["exp_avg"].get(name), tensors["exp_avg_sq"].get(name)
        if name not in index_of_layer(layers, index):
            raise ValueError(f"resume state: AdamW moments for {name}, which is not trained here")
        if avg is None or avg_sq is None or avg.shape != coef.shape or avg_sq.shape != coef.shape:
            raise ValueError(f"resume state: AdamW moments of {name} are missing or misshapen")
        # a NaN or negative moment would turn the next step's coefficients into NaN, and that checkpoint
        # would then replace the last good one
        if not (torch.isfinite(avg).all() and torch.isfinite(avg_sq).all() and (avg_sq >= 0).all()):
            raise ValueError(f"resume state: AdamW moments of {name} are not finite or negative (damaged file)")
        moments[index[id(coef)]] = {"step": torch.tensor(step), "exp_avg": avg, "exp_avg_sq": avg_sq}
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": moments, "param_groups": current["param_groups"]})


def index_of_layer(layers: Mapping[str, core.WaveFTLinear], index: Mapping[int, int]) -> set[str]:
    """The layer names whose coefficients the optimizer holds."""
    return {name for name, layer in layers.items() if id(layer.coef) in index}


def file_prefixes(names: Iterable[str], name_to_prefix: Callable[[str], str]) -> dict[str, str]:
    """``{module name: file prefix}``, checked up front so a bad mapping fails before training, not after.

    A prefix must be a non-empty string without ``.`` (A1111 splits keys at the first ``.``), one per module.
    """
    owners: dict[str, str] = {}  # prefix -> module name
    for name in names:
        prefix = name_to_prefix(name)
        if not isinstance(prefix, str) or not prefix or "." in prefix:
            raise ValueError(
                f"name_to_prefix({name!r}) returned {prefix!r}; expected a name like 'lora_unet_...' without '.'"
            )
        if prefix in owners:
            raise ValueError(f"name_to_prefix maps both {owners[prefix]!r} and {name!r} to {prefix!r}")
        owners[prefix] = name
    return {name: prefix for prefix, name in owners.items()}


def export_adapter(
    layers: Mapping[str, core.WaveFTLinear], name_to_prefix: Callable[[str], str]
) -> dict[str, core.LayerAdapter]:
    """The trained layers as ``{kohya prefix: LayerAdapter}`` (the file's keys), by :func:`core.export_layer`."""
    return {prefix: core.export_layer(layers[name]) for name, prefix in file_prefixes(layers, name_to_prefix).items()}


def training_metadata(settings: Any, data: Any, steps_done: int, num_params: int, output_name: str) -> dict[str, str]:
    """kohya-style ``ss_*`` keys (shown by A1111 / ComfyUI) and ``waveft_train_*`` keys for one run."""
    cfg = settings.waveft
    prompt = data.instance_prompt
    meta = {
        "ss_output_name": output_name,
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(settings.steps),
        "ss_learning_rate": str(settings.learning_rate),
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_lr_warmup_steps": str(settings.warmup_steps),
        "ss_gradient_accumulation_steps": str(settings.grad_accum),
        "ss_batch_size_per_device": str(settings.batch_size),
        "ss_num_train_images": str(data.num_images),
        "ss_resolution": f"({settings.resolution}, {settings.resolution})",
        "ss_seed": str(settings.seed),
        "ss_noise_offset": str(settings.noise_offset),
        "ss_min_snr_gamma": str(settings.min_snr_gamma),
        "ss_sd_model_name": settings.base_model_name,
        "ss_training_comment": prompt,
        "waveft_train_steps": str(steps_done),
        "waveft_train_lr": str(settings.learning_rate),
        "waveft_train_weight_decay": str(settings.weight_decay),
        "waveft_train_prediction_type": settings.prediction_type,
        "waveft_train_zero_terminal_snr": str(settings.zero_terminal_snr),
        "waveft_n_frequency": str(cfg.n_frequency) if cfg.total_budget is None else "proportional",
        "waveft_total_budget": str(num_params),
        "waveft_target_pattern": cfg.target_pattern,
        "waveft_base_model": settings.base_model_name,
        "waveft_instance_prompt": prompt,
        "waveft_num_train_images": str(data.num_images),
    }
    if prompt:  # A1111 shows these tags on the adapter's card
        meta["ss_tag_frequency"] = json.dumps({"instance": {prompt: data.num_images}})
    return meta
