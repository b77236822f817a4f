"""The training loop: WaveFT coefficients of a frozen denoiser, trained on cached latents.

One optimiser step ``k`` (0-based) with gradient accumulation ``A``::

    for m in 0..A-1:   i = k A + m;  batch, t, eps drawn from streams seeded by (seed, i)
                       x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
                       L_m = mean_b w_b |denoise(x_t, t, cond) - target|^2;  backward(L_m / A)
    loss_k = mean_m L_m  (must be finite)
    clip ||grad c||_2 to max_grad_norm;  AdamW step with lr(k)

Only ``c`` (float32 coefficients of the :class:`waveft_core.WaveFTLinear` layers) receives gradients;
every parameter of the model is frozen for the run, and the model is restored exactly afterwards (modules,
``requires_grad`` flags, train/eval modes, gradient checkpointing).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import diffusion as diff
from ._core import core
from .data import BatchSchedule, TrainingData, derive_seed, generator
from .parallel import Collective, check_collective, shard
from .settings import TrainSettings

Denoise = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Progress = Callable[[int, int, float], None]


class TrainingStopped(Exception):
    """Raise from ``should_stop`` or ``progress`` to stop a run; :func:`train_waveft` then saves the last
    completed step and returns normally with ``stopped=True`` (``should_stop()`` returning True does the same).
    """


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of step ``step`` (1-based) was NaN or Inf; nothing of it was applied.

    ``saved_path`` is the adapter of the last completed step on disk (``None`` if none was written).
    """

    def __init__(self, step: int, what: str, value: float, saved_path: Path | None = None) -> None:
        super().__init__(step, what, value)
        self.step, self.what, self.value, self.saved_path = step, what, value, saved_path
        self.saved_step = step - 1  # the step whose adapter ``saved_path`` holds

    def __str__(self) -> str:
        kept = f"; the adapter of step {self.saved_step} is kept at {self.saved_path}" if self.saved_path else ""
        return f"training step {self.step}: {self.what} is {self.value} (try a lower learning rate){kept}"


@dataclass
class TrainResult:
    """What a run produced: ``layers`` maps kohya prefixes to the trained layers (the file's content)."""

    layers: dict[str, core.LayerAdapter]
    losses: list[float]
    steps_done: int
    stopped: bool = False
    saved_path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _first_parameter(model: nn.Module) -> torch.Tensor:
    """The parameter that sets the device and input dtype; also rejects models autograd cannot train through."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise ValueError("the model has no floating-point parameters")
    frozen_for_good = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if frozen_for_good is not None:
        raise ValueError(
            f"parameter {frozen_for_good!r} is an inference tensor (made under torch.inference_mode); "
            "autograd cannot train through it: give the model ordinary copies of its parameters first"
        )
    return floating[0]


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(reference: torch.Tensor) -> torch.dtype:
    # fp8 weights are storage only: hosts upcast them per layer, and fp8 inputs would wreck the latents
    return reference.dtype if reference.dtype in COMPUTE_DTYPES else torch.float32


@contextlib.contextmanager
def prepared_model(
    model: nn.Module, checkpointing: bool, set_checkpointing: Callable[[bool], None] | None
) -> Iterator[None]:
    """Freeze every parameter, switch to train mode and gradient checkpointing; undo it all on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    undo_checkpointing: Callable[[], None] | None = None
    if checkpointing:
        undo_checkpointing = _enable_checkpointing(model, set_checkpointing)
    try:
        model.requires_grad_(False)
        model.train()
        yield
    finally:
        if undo_checkpointing is not None:
            undo_checkpointing()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


def _enable_checkpointing(model: nn.Module, hook: Callable[[bool], None] | None) -> Callable[[], None]:
    if hook is not None:
        hook(True)
        return lambda: hook(False)
    if not hasattr(model, "enable_gradient_checkpointing"):
        raise ValueError(
            "gradient_checkpointing=True needs a model with enable_gradient_checkpointing() (diffusers) "
            "or a set_gradient_checkpointing hook"
        )
    was_on = bool(getattr(model, "is_gradient_checkpointing", False))
    model.enable_gradient_checkpointing()
    return (lambda: None) if was_on else model.disable_gradient_checkpointing


def _grad_scaler(device: torch.device, enabled: bool) -> Any:
    """fp16 loss scaler; ``torch.amp.GradScaler`` needs torch >= 2.3, A1111 1.10 ships 2.1 (CUDA-only then)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def _check_autocast(device: torch.device, precision: str) -> None:
    """Refuse, before the first step, a mixed precision this torch cannot autocast on ``device``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.1 warns, then raises on entry: the error is what we report
            with torch.autocast(device.type, dtype=dtype):
                pass
    except RuntimeError as err:
        raise ValueError(
            f"mixed_precision={precision!r} is not available on {device.type} with torch {torch.__version__} "
            f"({err}); choose {'bf16' if precision == 'fp16' else 'fp16'} or 'no'"
        ) from None


@contextlib.contextmanager
def _model_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNGs of the CPU and ``device`` (the model's dropout uses them) and restore them after,
    so a run is reproducible and the caller's random state is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class _Run:
    """The state of one run on an attached model: optimiser, loss scaler, batch schedule, counters."""

    def __init__(
        self,
        layers: dict[str, core.WaveFTLinear],
        denoise: Denoise,
        data: TrainingData,
        settings: TrainSettings,
        device: torch.device,
        input_dtype: torch.dtype,
        distributed: Collective | None = None,
    ) -> None:
        self.layers, self.denoise, self.data, self.settings = layers, denoise, data, settings
        self.device, self.input_dtype = device, input_dtype
        self.distributed = distributed
        self.world_size = distributed.world_size if distributed is not None else 1
        self.rank = distributed.rank if distributed is not None else 0
        self.precision = settings.precision(device, input_dtype)
        self.params = [layer.coef for layer in layers.values()]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        _check_autocast(device, self.precision)
        self.scaler = _grad_scaler(device, enabled=self.precision == "fp16")
        # each micro-batch is the global batch of all processes; every process draws it and keeps its share
        self.schedule = BatchSchedule(data.buckets, settings.batch_size * self.world_size, settings.seed)
        abar = diff.alphas_cumprod(settings.num_train_timesteps, settings.beta_start, settings.beta_end,
                                   settings.zero_terminal_snr)  # fmt: skip
        self.abar = abar.to(torch.float32)
        self.losses: list[float] = []
        self.steps_done = 0

    def fingerprint(self) -> dict[str, Any]:
        shapes = {name: [*layer.shape, layer.coef.numel()] for name, layer in self.layers.items()}
        trajectory = self.settings.trajectory_dict(self.device, self.input_dtype)
        # the trajectory depends on the global batch only, so a run may resume with another process count
        trajectory["batch_size"] = self.settings.batch_size * self.world_size
        raw = {
            "settings": trajectory,
            "data": self.data.fingerprint(),
            "layers": shapes,
        }
        return json.loads(json.dumps(raw))  # the form it takes after a save/load round trip

    def train_state(self) -> ckpt.TrainState:
        scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        return ckpt.TrainState(self.steps_done, list(self.losses), self.fingerprint(), scaler)

    def resume_from(self, path: Path) -> None:
        state, tensors = ckpt.read_state(path)
        current = self.fingerprint()
        if state.fingerprint != current:
            differ = sorted(
                f"{group}.{key}"
                for group in current
                for key in set(current[group]) | set(state.fingerprint.get(group, {}))
                if current[group].get(key) != state.fingerprint.get(group, {}).get(key)
            )
            raise ValueError(
                f"{path.name} was saved by a run with other settings or data ({', '.join(differ[:6])}); "
                "pass resume=False to start over"
            )
        if state.step > self.settings.steps:
            raise ValueError(
                f"{path.name} holds {state.step} trained steps, more than the {self.settings.steps} asked for; "
                "ask for at least as many, or pass resume=False to start over"
            )
        ckpt.restore_state(tensors, state, self.layers, self.optimizer)
        if state.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.scaler)
        self.steps_done, self.losses = state.step, list(state.losses)

    def _micro_loss(self, index: int) -> torch.Tensor:
        settings = self.settings
        batch = self.schedule.batch(index)
        gen = generator(settings.seed, "noise", index)
        # timesteps and noise of the whole global batch, drawn in one order whatever the process count
        timesteps = diff.sample_timesteps(len(batch), settings.timestep_range, gen)
        noise = diff.sample_noise((len(batch), *self.data.latents[batch[0]].shape), settings.noise_offset, gen)
        rows = shard(len(batch), self.rank, self.world_size)
        if rows.start == rows.stop:  # this process has no share of a small last batch: it adds zero gradient
            return torch.zeros((), device=self.device)
        latents, cond = self.data.collate(batch[rows], self.device, self.input_dtype)
        timesteps, noise = timesteps[rows], noise[rows].to(self.device)
        abar = self.abar[timesteps].to(self.device)
        noisy = diff.add_noise(latents, noise, abar).to(self.input_dtype)
        target = diff.prediction_target(latents, noise, abar, settings.prediction_type)
        weights = diff.snr_weights(abar, settings.min_snr_gamma, settings.prediction_type)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with _model_rng(self.device, derive_seed(settings.seed, "model", index)):
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                prediction = self.denoise(noisy, timesteps.to(self.device), cond)
            loss = diff.diffusion_loss(prediction, target, weights)
            if self.world_size > 1:  # this share's part of the global batch mean: the sum over processes is it
                loss = loss * (len(timesteps) / len(batch))
            self.scaler.scale(loss / settings.grad_accum).backward()
        return loss.detach()

    def _all_reduce(self, total: torch.Tensor) -> torch.Tensor:
        """Sum the coefficient gradients and the loss over all processes in one collective; returns the loss."""
        assert self.distributed is not None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [total.reshape(1).float()])
        flat = self.distributed.all_reduce_sum(flat)
        offset = 0
        for param in self.params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype).clone()
            offset += param.numel()
        return flat[-1]

    def stop_agreed(self, wanted: bool) -> bool:
        """Whether any process wants to stop (all must leave the loop at the same step, or the others would
        wait forever in the next all-reduce)."""
        if self.distributed is None:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=self.device)
        return bool(self.distributed.all_reduce_sum(flag).item() > 0)

    def step(self) -> float:
        """One optimiser step; returns its loss. Raises :class:`NonFiniteLossError` before applying a bad step."""
        settings, step = self.settings, self.steps_done
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(settings.grad_accum):
            total += self._micro_loss(step * settings.grad_accum + micro)
        if self.distributed is not None:
            total = self._all_reduce(total)
        loss = float(total) / settings.grad_accum  # one device sync per step
        if not math.isfinite(loss):
            raise NonFiniteLossError(step + 1, "the loss", loss)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, settings.max_grad_norm or float("inf"))
        if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16 skips such steps by design
            raise NonFiniteLossError(step + 1, "the gradient norm", float(norm))
        lr = diff.learning_rate(
            step, settings.steps, settings.learning_rate, settings.warmup_steps, settings.lr_scheduler
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss)
        self.steps_done = step + 1
        return loss


class _Writer:
    """Writes the adapter + resume state of a run; remembers the last step written."""

    def __init__(
        self,
        output_path: Path | None,
        run: _Run,
        name_to_prefix: Callable[[str], str],
        metadata: Mapping[str, str] | None,
    ) -> None:
        self.path, self.run, self.name_to_prefix = output_path, run, name_to_prefix
        self.extra = dict(metadata or {})
        self.saved_step: int | None = None
        self.output_name = run.settings.output_name or (output_path.stem if output_path else "waveft")

    def adapter(self) -> tuple[dict[str, core.LayerAdapter], dict[str, str]]:
        layers = ckpt.export_adapter(self.run.layers, self.name_to_prefix)
        num_params = sum(layer.num_params for layer in layers.values())
        meta = ckpt.training_metadata(
            self.run.settings, self.run.data, self.run.steps_done, num_params, self.output_name
        )
        meta.update({str(k): str(v) for k, v in self.extra.items()})
        return layers, meta

    def save(self) -> Path | None:
        """Write the adapter and resume state; a diverged update (beyond what a file may hold) is never
        written over the last good checkpoint: it raises :class:`NonFiniteLossError` instead."""
        if self.path is None or self.run.steps_done == 0:
            return None
        largest = max(abs(layer.scaling) * float(layer.coef.detach().abs().max()) for layer in self.run.layers.values())
        if not largest <= core.MAX_UPDATE:  # NaN included
            raise NonFiniteLossError(self.run.steps_done, f"the update (scaling x largest coefficient; a file holds at most "
                                     f"{core.MAX_UPDATE:g})", largest)
        if self.run.rank == 0:  # the other processes hold the same coefficients: one writer is enough
            layers, meta = self.adapter()
            core.save_adapter(self.path, layers, meta)
            ckpt.save_state(ckpt.state_path(self.path), self.run.layers, self.run.optimizer, self.run.train_state())
        self.saved_step = self.run.steps_done
        return self.path

    def save_quietly(self) -> Path | None:
        """Save after an error, never masking it; returns the adapter on disk (if any)."""
        if self.saved_step != self.run.steps_done:
            with contextlib.suppress(Exception):
                self.save()
        return self.path if self.saved_step else None


def _loop(run: _Run, writer: _Writer, progress: Progress | None, should_stop: Callable[[], bool] | None) -> None:
    total, every = run.settings.steps, run.settings.save_every
    while run.steps_done < total:
        if run.stop_agreed(should_stop is not None and should_stop()):
            raise TrainingStopped
        loss = run.step()
        if every and run.steps_done % every == 0 and run.steps_done < total:
            writer.save()
        if progress is not None:
            progress(run.steps_done, total, loss)


def train_waveft(
    model: nn.Module,
    denoise: Denoise,
    data: TrainingData,
    settings: TrainSettings,
    *,
    name_to_prefix: Callable[[str], str],
    output_path: str | Path | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    metadata: Mapping[str, str] | None = None,
    keep_attached: bool = False,
    set_gradient_checkpointing: Callable[[bool], None] | None = None,
    input_dtype: torch.dtype | None = None,
    distributed: Collective | None = None,
) -> TrainResult:
    """Train WaveFT coefficients on ``model`` (the frozen denoiser ``denoise`` calls) and save them.

    ``denoise(noisy_latents, timesteps, cond)`` returns the model's prediction (``timesteps`` are DDPM indices
    in ``[0, num_train_timesteps)``, ``cond`` the batched dict of ``data.conds``). ``name_to_prefix`` maps a
    module name of ``model`` to its kohya prefix in the file (``lora_unet_...``). With ``output_path`` the
    adapter (and ``<stem>.waveft-state``) is written every ``settings.save_every`` steps, at the end, on a
    stop and after an error; with ``resume`` a matching state file continues the run exactly.
    ``should_stop()`` is checked before every step. ``metadata`` adds to the file's metadata.
    ``input_dtype`` is what the noisy latents and the conditioning are cast to before ``denoise`` (default:
    the model's parameter dtype, or float32 when that is a storage-only type such as fp8).
    The model is restored exactly on return (and on any error); ``keep_attached=True`` leaves the trained
    :class:`waveft_core.WaveFTLinear` layers in place after a successful or stopped run.
    ``distributed`` (a :class:`trainer.parallel.Collective`) makes this one of several data-parallel processes
    that share ``data`` and ``settings`` (see :mod:`trainer.parallel`): ``batch_size`` is per process, only
    rank 0 writes files, and every process ends with the same coefficients.
    """
    if distributed is not None:
        check_collective(distributed)
    if core.waveft_layers(model):
        raise ValueError("the model already has WaveFT layers attached; detach them before training")
    path = Path(output_path) if output_path is not None else None
    reference = _first_parameter(model)
    layers: dict[str, core.WaveFTLinear] = {}
    attached = False
    # hosts often call from no_grad / inference mode; coefficients made there could never be trained
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        prepared_model(model, settings.gradient_checkpointing, set_gradient_checkpointing),
    ):
        try:
            layers = core.attach_waveft(model, settings.waveft)
            attached = True
            ckpt.file_prefixes(layers, name_to_prefix)
            dtype = input_dtype or _compute_dtype(reference)
            run = _Run(layers, denoise, data, settings, reference.device, dtype, distributed)
            writer = _Writer(path, run, name_to_prefix, metadata)
            if resume and path is not None and ckpt.state_path(path).exists():
                run.resume_from(ckpt.state_path(path))
            stopped = False
            try:
                _loop(run, writer, progress, should_stop)
            except TrainingStopped:
                stopped = True
            except NonFiniteLossError as err:
                err.saved_path = writer.save_quietly()
                err.saved_step = writer.saved_step or 0
                raise
            except BaseException:
                writer.save_quietly()
                raise
            try:
                saved = writer.save() if writer.saved_step != run.steps_done else writer.path
            except NonFiniteLossError as err:
                err.saved_path, err.saved_step = (writer.path if writer.saved_step else None), writer.saved_step or 0
                raise
            exported, meta = writer.adapter()
        except BaseException:
            if attached:
                core.detach_waveft(model)
            raise
        if not keep_attached:
            core.detach_waveft(model)
        else:
            for layer in layers.values():
                layer.coef.requires_grad_(False)
    return TrainResult(exported, list(run.losses), run.steps_done, stopped, saved, meta)
