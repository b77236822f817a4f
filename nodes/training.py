"""Training nodes: WaveFT Train (subject / style from a few images) and WaveFT Save; each ``execute`` is one
call into the run (:mod:`.training_run`).

Node ids are a saved workflow's identity: never rename them.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer import UI_DEFAULTS
from ..waveft_core import SDXL_ATTENTION_PATTERN, AdapterFile, supported_wavelets
from . import paths
from .loaders import CATEGORY, WaveFT
from .training_run import run_training, save

MAX_SEED = 2**63 - 1
D = UI_DEFAULTS  # the engine's and the method's defaults, shared with A1111's tab


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
        opt = {key: values[0] for key, values in lists.items()}  # widgets arrive as one-element lists
        trained, adapter, plot, trained_clip = run_training(model[0], clip[0], vae[0], images, opt)
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
