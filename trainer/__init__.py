"""Host-agnostic WaveFT training engine (imports no ComfyUI / A1111 / gradio module).

Hosts encode images and prompts themselves, then call::

    data = TrainingData(latents=[...], conds=[{...}], instance_prompt="a photo of zjw dog")
    result = train_waveft(unet, denoise, data, TrainSettings(steps=500),
                          name_to_prefix=lambda n: kohya_name("unet", n),  # waveft_core.names
                          output_path="models/waveft/zjw.safetensors",
                          progress=bar_update, should_stop=interrupted)

Public API: :class:`TrainSettings`, :class:`TrainingData`, :func:`train_waveft`, :class:`TrainResult`,
:class:`TrainingStopped`, :class:`NonFiniteLossError`, :func:`plot_losses`, :class:`TextProgress`,
:func:`state_path`, :func:`saved_steps`, :func:`run_key`, :func:`block_checkpointing`. ``python -m trainer demo`` runs the whole job on a tiny built-in model.
"""

from .checkpoint import run_key, saved_steps, state_path
from .checkpointing import block_checkpointing
from .data import TrainingData
from .engine import NonFiniteLossError, TrainingStopped, TrainResult, train_waveft
from .plot import encode_png, plot_losses
from .progress import TextProgress
from .settings import UI_DEFAULTS, TrainSettings

__all__ = [
    "NonFiniteLossError",
    "TextProgress",
    "TrainResult",
    "TrainSettings",
    "UI_DEFAULTS",
    "TrainingData",
    "TrainingStopped",
    "block_checkpointing",
    "encode_png",
    "plot_losses",
    "run_key",
    "saved_steps",
    "state_path",
    "train_waveft",
]
