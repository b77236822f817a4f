"""Training nodes: WaveFT Train (subject / style from a few images) and WaveFT Save.

Node ids are a saved workflow's identity: never rename them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..trainer import (
    UI_DEFAULTS,
    TrainingData,
    TrainResult,
    TrainSettings,
    block_checkpointing,
    plot_losses,
    run_key,
    saved_steps,
    state_path,
    train_waveft,
)
from ..waveft_core import SDXL_ATTENTION_PATTERN, AdapterFile, WaveFTConfig, save_adapter_new, supported_wavelets
from . import paths
from .comfy_patching import apply_layers
from .comfy_training import (
    Watch,
    base_model_version,
    encode_dataset,
    in_loop_conditioning,
    make_denoise,
    require_text_encoder_targets,
    schedule,
    show_on_node,
    training_parts,
)
from .loaders import CATEGORY, WaveFT
from .patches import part_pattern, part_prefix

log = logging.getLogger("WaveFT")
MAX_SEED = 2**63 - 1
D = UI_DEFAULTS  # the engine's and the method's defaults, shared with A1111's tab


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


class WaveFTTrain(io.ComfyNode):
    """Train a WaveFT adapter on a few images of a subject (or style) with one instance prompt."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WaveFTTrain",
            display_name="WaveFT Train",
            category=CATEGORY,
            description="Train WaveFT wavelet coefficients of the attention layers on your images, then use the trained model.",
            is_input_list=True,  # IMAGE lists of different sizes become aspect buckets
            inputs=[
                io.Model.Input("model", tooltip="The base model to personalise (SDXL)."),
                io.Clip.Input("clip", tooltip="Encodes the instance prompt once, before training."),
                io.Vae.Input("vae", tooltip="Encodes the images once, before training."),
                io.Image.Input("images", tooltip="One or more images (a batch or a list; any sizes)."),
                io.String.Input("instance_prompt", default=D["instance_prompt"], multiline=True,
                                tooltip="The caption of every image: a rare word for your subject plus its class (use the same words when generating)."),
                io.Int.Input("budget", default=D["budget"], min=1, max=1 << 24, tooltip="Trainable coefficients per layer (2592 = LoRA rank 1's size on SDXL)."),
                io.Combo.Input("wavelet", options=list(supported_wavelets()), default=D["wavelet"],
                               tooltip="Wavelet of the inverse transform that turns coefficients into the weight update (db1 = Haar, the paper's choice)."),
                io.Float.Input("scaling", default=D["scaling"], min=0.01, max=1000.0, step=0.01,
                               tooltip="Multiplies the update: dW = scaling * IDWT2(C). The paper uses 25 with learning rate 1e-4."),
                io.Int.Input("steps", default=D["steps"], min=1, max=100000,
                             tooltip="Optimizer steps. 500 at 1024 px is the paper's setting (hours without a GPU; try 100 at 512 px first)."),
                io.Float.Input("learning_rate", default=D["learning_rate"], min=1e-7, max=1.0, step=1e-5, round=False,
                               tooltip="AdamW learning rate of the coefficients."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per step (from one aspect bucket). More needs more memory."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=256,
                             tooltip="Batches summed per optimizer step: a larger effective batch without more memory."),
                io.Int.Input("resolution", default=D["resolution"], min=32, max=4096, step=8, tooltip="Images are resized and cropped to about this many pixels squared."),
                io.Int.Input("seed", default=D["seed"], min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Training randomness (noise, timesteps, order). Keep 'control after generate' on fixed (the default here): another seed is another run, so re-queueing would start over instead of continuing."),
                io.String.Input("target_pattern", default=SDXL_ATTENTION_PATTERN, tooltip="Regex of the Linear layers to adapt."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Less memory, about 30% slower."),
                io.Combo.Input("precision", options=["auto", "bf16", "fp16", "no"], default="auto",
                               tooltip="Autocast. auto: the model's own half type on a GPU (bf16 where the card has it, else fp16; on a Mac fp16 where torch can loss-scale there), none on CPU."),
                io.String.Input("name", default="waveft_subject", tooltip="Recorded in the adapter; names the file saved on Cancel and the checkpoints."),
                io.Int.Input("save_every", default=D["save_every"], min=0, max=100000, optional=True,
                             tooltip="Checkpoint every N steps (0: only on Cancel or an error) in models/waveft/checkpoints."),
                io.Boolean.Input("resume", default=True, optional=True,
                                 tooltip="Continue this run (same model, images and settings) from its checkpoint, after a crash, an error or Cancel; off: start over."),
                io.String.Input("text_encoder_pattern", default="", optional=True,
                                tooltip="Regex of text-encoder Linear layers to train as well, e.g. self_attn\\.(q_proj|k_proj|v_proj|out_proj)$ (empty: the UNet only). The text encoders then stay in memory and run at every step."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained adapter applied."),
                WaveFT.Output(display_name="WAVEFT", tooltip="The trained adapter (connect WaveFT Save)."),
                io.Image.Output(display_name="loss_plot"),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the trained text-encoder layers applied (the input CLIP if none were trained)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, **lists) -> io.NodeOutput:
        model, clip, vae = model[0], clip[0], vae[0]
        opt = {key: values[0] for key, values in lists.items()}  # widgets arrive as one-element lists
        settings = train_settings(model, opt)
        data = encode_dataset(model, clip, vae, images, opt["instance_prompt"], settings.resolution)
        watch = Watch(settings.steps)  # ComfyUI attributes the bar to the executing node
        result = train(model, clip, data, settings, opt, watch)
        adapter = AdapterFile(result.layers, result.metadata)
        if watch.cancelled:  # keep the last completed step on disk, then let ComfyUI report the interrupt
            if result.steps_done:
                path = save(adapter, paths.LORA_FOLDER, f"{opt['name']}_step{result.steps_done}")
                show_on_node(f"Cancelled after step {result.steps_done}: saved {path}")
            raise mm.InterruptProcessingException()
        trained, trained_clip = apply_layers(model, clip, result.layers, 1.0, 1.0, opt["name"])
        plot = plot_losses(result.losses, title=opt["name"])[None].float() / 255
        return io.NodeOutput(trained, adapter, plot, trained_clip, ui=ui.PreviewImage(plot, cls=cls))


class WaveFTSave(io.ComfyNode):
    """Save a ``WAVEFT`` adapter to models/waveft (or models/loras) under a new, safe file name."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WaveFTSave",
            display_name="WaveFT Save",
            category=CATEGORY,
            description="Write the adapter as a .safetensors file (never overwrites: a counter is added).",
            inputs=[
                WaveFT.Input("waveft", tooltip="The adapter to save, e.g. WaveFT Train's WAVEFT output."),
                io.String.Input("filename", default="waveft_subject", tooltip="File name (subfolders allowed) inside the chosen folder."),
                io.Combo.Input("folder", options=list(paths.SAVE_FOLDERS), default=paths.LORA_FOLDER,
                               tooltip="models/loras (listed by the stock Load LoRA nodes and A1111 too) or models/waveft."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, waveft: AdapterFile, filename: str, folder: str) -> io.NodeOutput:
        path = save(waveft, folder, filename)
        return io.NodeOutput(ui={"text": [str(path)]})
