"""One WaveFT Train run in ComfyUI, start to end: the node's widgets as engine settings, the run's checkpoint
and whether to continue it, training on ComfyUI's model (:mod:`.comfy_model` adapts it), progress and Cancel,
saving, and the trained model. The node classes (:mod:`.training`) call :func:`run_training` and :func:`save`.

Cancel: ``should_stop`` polls ComfyUI's interrupt flag, and an interrupt raised by the progress hook is turned
into ``TrainingStopped``; either way the engine returns the adapter of the last completed step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..trainer import (
    UI_DEFAULTS,
    TrainingData,
    TrainingStopped,
    TrainResult,
    TrainSettings,
    block_checkpointing,
    plot_losses,
    run_key,
    saved_steps,
    state_path,
    train_waveft,
)
from ..waveft_core import AdapterFile, WaveFTConfig, save_adapter_new
from . import paths
from .comfy_model import (
    base_model_version,
    encode_dataset,
    in_loop_conditioning,
    make_denoise,
    require_text_encoder_targets,
    schedule,
    training_parts,
)
from .comfy_patching import apply_layers
from .patches import part_pattern, part_prefix

log = logging.getLogger("WaveFT")
D = UI_DEFAULTS


def run_training(model: Any, clip: Any, vae: Any, images: list, opt: dict) -> tuple[Any, AdapterFile, torch.Tensor, Any]:
    """The whole run behind WaveFT Train: ``(trained model, adapter, loss plot, trained CLIP)``. On Cancel the
    last completed step is saved (and shown on the node) before ComfyUI reports the interrupt."""
    settings = train_settings(model, opt)
    data = encode_dataset(model, clip, vae, images, opt["instance_prompt"], settings.resolution)
    watch = Watch(settings.steps)  # ComfyUI attributes the bar to the executing node
    result = train(model, clip, data, settings, opt, watch)
    adapter = AdapterFile(result.layers, result.metadata)
    if watch.cancelled:
        if result.steps_done:
            path = save(adapter, paths.LORA_FOLDER, f"{opt['name']}_step{result.steps_done}")
            show_on_node(f"Cancelled after step {result.steps_done}: saved {path}")
        raise mm.InterruptProcessingException()
    trained, trained_clip = apply_layers(model, clip, result.layers, 1.0, 1.0, opt["name"])
    plot = plot_losses(result.losses, title=opt["name"])[None].float() / 255
    return trained, adapter, plot, trained_clip


# engine field -> the widget the user sees, so a refused value is named as on the node
WIDGET_NAMES = {"mixed_precision": "precision", "grad_accum": "grad_accumulation", "output_name": "name", "n_frequency": "budget"}


def train_settings(model, opt: dict) -> TrainSettings:
    """The node's widgets as the engine's settings, with the model's own noise schedule and prediction type."""
    try:
        return _train_settings(model, opt)
    except ValueError as err:
        message = str(err)
        for field_name, widget in WIDGET_NAMES.items():
            message = re.sub(rf"\b{field_name}\b", widget, message)
        raise ValueError(f"WaveFT Train: {message}") from None


def _train_settings(model, opt: dict) -> TrainSettings:
    return TrainSettings(
        steps=opt["steps"], learning_rate=opt["learning_rate"], batch_size=opt["batch_size"],
        grad_accum=opt["grad_accumulation"], seed=opt["seed"], resolution=opt["resolution"],
        gradient_checkpointing=opt["gradient_checkpointing"], mixed_precision=opt["precision"],
        output_name=opt["name"], save_every=opt.get("save_every", D["save_every"]), **schedule(model),
        waveft=WaveFTConfig(n_frequency=opt["budget"], scaling=opt["scaling"], wavelet=opt["wavelet"],
                            target_pattern=part_pattern(opt["target_pattern"], opt.get("text_encoder_pattern", ""))),
    )


def run_checkpoint(parts: torch.nn.Module, dtype: torch.dtype, settings: TrainSettings, data: TrainingData, name: str) -> Path:
    """Where this run (same model, images and settings) keeps its latest adapter and resume state."""
    weights = [m.weight for n, m in parts.named_modules() if isinstance(m, torch.nn.Linear) and settings.waveft.targets(n)]
    device = next(parts.parameters()).device
    return paths.checkpoint_path(folder_paths, name, run_key(settings, data, weights, device, dtype))


def train(model, clip, data: TrainingData, settings: TrainSettings, opt: dict, watch: Watch) -> TrainResult:
    """Train on ComfyUI's UNet (and text encoders, with a text-encoder pattern), checkpointing as it goes and
    continuing this run's checkpoint when asked to."""
    te_pattern = opt.get("text_encoder_pattern", "")
    conditioning = in_loop_conditioning(model, clip, opt["instance_prompt"]) if te_pattern else None
    with torch.inference_mode(False), training_parts(model, clip if te_pattern else None, settings.waveft) as (parts, dtype):
        if te_pattern:
            require_text_encoder_targets(parts, settings.waveft, te_pattern)
        checkpoint = own_checkpoint(run_checkpoint(parts, dtype, settings, data, opt["name"]), settings.steps)
        resume = opt.get("resume", True) and continues(checkpoint, settings.steps)
        unet = parts["unet"]
        return train_waveft(
            parts, make_denoise(unet, dtype, conditioning), data, settings,
            name_to_prefix=part_prefix, output_path=checkpoint, resume=resume,
            progress=watch.progress, should_stop=watch.should_stop,
            metadata={"ss_base_model_version": base_model_version(model)},
            set_gradient_checkpointing=block_checkpointing(unet), input_dtype=dtype,
        )


def own_checkpoint(checkpoint: Path, steps: int) -> Path:
    """Where a run of ``steps`` keeps its checkpoints: the run's own file, unless that holds a longer run
    (which must not be overwritten by a shorter one), then ``<file>-upto<steps>``."""
    saved = saved_steps(state_path(checkpoint))
    if saved is None or saved <= steps:
        return checkpoint
    shorter = checkpoint.with_name(f"{checkpoint.stem}-upto{steps}{checkpoint.suffix}")
    log.info("[WaveFT] %s holds %d steps, more than the %d asked for: it is kept, and this run trains from the "
             "start into %s", checkpoint.name, saved, steps, shorter.name)
    return shorter


def continues(checkpoint: Path, steps: int) -> bool:
    """Whether to continue the run in ``checkpoint``: not when it is longer than ``steps`` (it holds no earlier
    step), so a shorter run is trained from the start instead of returning the longer one."""
    saved = saved_steps(state_path(checkpoint))
    if saved is not None and saved > steps:
        log.info("[WaveFT] %s holds %d steps, more than the %d asked for: training from the start", checkpoint, saved, steps)
        return False
    if saved is not None:
        log.info("[WaveFT] continuing the run saved in %s from step %d", checkpoint, saved)
    return True


def save(adapter: AdapterFile, folder: str, name: str) -> Path:
    """Write ``adapter`` under a new, safe name in ``models/<folder>`` (never overwrites); returns the path."""
    metadata = {k: v for k, v in adapter.metadata.items() if k != "ss_output_name"}
    path = save_adapter_new(paths.save_candidates(folder_paths, folder, name), adapter.layers, metadata)
    log.info("[WaveFT] saved %s", path)
    return path


def show_on_node(text: str) -> None:
    """Show ``text`` on the executing node in the page (ComfyUI's ``progress_text`` message); a no-op where
    there is no server (tests, scripts) or the host predates the message."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if context is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, context.node_id)


class Watch:
    """Progress bar per step and Cancel, in the engine's terms (``progress`` / ``should_stop``)."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.cancelled = False

    def should_stop(self) -> bool:
        self.cancelled = self.cancelled or mm.processing_interrupted()
        return self.cancelled

    def progress(self, step: int, total: int, loss: float) -> None:
        try:
            self.bar.update_absolute(step, total)  # ComfyUI's hook raises here when Cancel was pressed
        except mm.InterruptProcessingException:
            self.cancelled = True
            raise TrainingStopped from None
