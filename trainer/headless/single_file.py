"""Load an SDXL single-file checkpoint (the A1111 / ComfyUI layout) into diffusers / transformers models, offline.

A checkpoint holds four models under fixed prefixes: ``model.diffusion_model.*`` (the UNet, ldm names),
``first_stage_model.*`` (the VAE), ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L text model, Hugging
Face names) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG text model, OpenCLIP names). SDXL
derivatives (Pony, Illustrious, NoobAI, ...) share the layout; a ``v_pred`` key marks a v-prediction model.

Every size comes from the tensor shapes (so a cut-down test file and a real one load alike); what shapes
cannot tell (head width 64, activations, the VAE's scaling factor 0.13025) comes from the SDXL configs
shipped in ``configs/``. The key renaming is diffusers' own (``diffusers.loaders.single_file_utils``: pure
functions of a state dict, no network); the models are built on the meta device and take the file's tensors
directly, so no random initialisation is paid for and nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
CONFIGS = Path(__file__).with_name("configs")
HEAD_WIDTH = 64  # SDXL's attention heads are 64 wide in every block and both text encoders
COMPONENTS = ("unet", "vae", "text")


class NotSDXLError(ValueError):
    """The file is not an SDXL single-file checkpoint; the message says what it looks like instead."""


# (test on the key set, what such a file is); the first match names the file
_KINDS: tuple[tuple[Any, str], ...] = (
    (lambda k: any(".waveft_coef" in key for key in k), "a WaveFT adapter, not a checkpoint"),
    (lambda k: any(key.startswith(("lora_unet_", "lora_te")) or ".lora_down." in key or ".lora_A." in key
                   for key in k), "a LoRA / LyCORIS adapter, not a checkpoint"),  # fmt: skip
    (lambda k: any(".joint_blocks." in key for key in k), "Stable Diffusion 3 / 3.5"),
    (lambda k: any("double_blocks." in key for key in k), "a FLUX model"),
    (lambda k: any(key.startswith("cond_stage_model.transformer.") for key in k), "Stable Diffusion 1.x"),
    (lambda k: any(key.startswith("cond_stage_model.model.") for key in k), "Stable Diffusion 2.x"),
    (lambda k: any(key.startswith("conditioner.embedders.0.model.") for key in k),
     "the SDXL refiner (one OpenCLIP text encoder; train on an SDXL base model)"),  # fmt: skip
    (lambda k: any(key.startswith(("down_blocks.", "conv_in.")) for key in k),
     "a diffusers-layout model file (train on the single-file checkpoint A1111 / ComfyUI load)"),  # fmt: skip
)
_REQUIRED = {
    "the UNet (model.diffusion_model.*)": UNET + "input_blocks.0.0.weight",
    "the VAE (first_stage_model.*)": VAE + "encoder.conv_in.weight",
    "text encoder 1 (conditioner.embedders.0.transformer.*)": CLIP_L + "text_model.embeddings.token_embedding.weight",
    "text encoder 2 (conditioner.embedders.1.model.*)": CLIP_G + "token_embedding.weight",
}


def identify(keys: Iterable[str], name: str = "the file") -> None:
    """Raise :class:`NotSDXLError` naming what ``keys`` look like unless they are a whole SDXL checkpoint."""
    keys = set(keys)
    for test, kind in _KINDS:
        if test(keys):
            raise NotSDXLError(f"{name} is {kind}, not an SDXL checkpoint")
    missing = [part for part, key in _REQUIRED.items() if key not in keys]
    if missing and len(missing) < len(_REQUIRED):
        raise NotSDXLError(f"{name} looks like a partial SDXL checkpoint: it lacks {', '.join(missing)}")
    if missing:
        raise NotSDXLError(f"{name} is not an SDXL checkpoint (no SDXL key found; first keys: {sorted(keys)[:3]})")
    if UNET + "label_emb.0.0.weight" not in keys:
        raise NotSDXLError(f"{name} has SDXL's text encoders but a UNet without SDXL's size conditioning (label_emb)")


def _count(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children ``prefix<N>.`` the keys have (``max N + 1``; 0 if none)."""
    numbers = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix) and k[len(prefix)].isdigit()}
    return max(numbers) + 1 if numbers else 0


def _groups(channels: Iterable[int], preferred: int) -> int:
    """GroupNorm groups: SDXL's 32 where every width divides, else their common divisor (cut-down models)."""
    return math.gcd(preferred, *channels)


def _template(name: str) -> dict[str, Any]:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config.pop("_comment", None)
    return config


def unet_config(shapes: dict[str, tuple[int, ...]], pooled_dim: int) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config from the UNet's shapes (``shapes`` keyed without prefix)."""
    keys = shapes.keys()
    inputs, downs = _count(keys, "input_blocks."), sum(1 for k in keys if k.startswith("input_blocks.") and k.endswith(".op.weight"))
    levels = downs + 1
    per_level = (inputs - 1 - downs) // levels
    first_block = [1 + level * (per_level + 1) for level in range(levels)]
    channels = [shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first_block]
    depths = [_count(keys, f"input_blocks.{i}.1.transformer_blocks.") for i in first_block]
    if _count(keys, "middle_block.1.transformer_blocks.") != depths[-1]:
        raise NotSDXLError("the UNet's middle block and its last level have different transformer depths")
    attn = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    adm = shapes["label_emb.0.0.weight"][1]
    config = _template("unet")
    config.update(
        in_channels=shapes["input_blocks.0.0.weight"][1],
        out_channels=shapes["out.2.weight"][0],
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        block_out_channels=channels,
        layers_per_block=per_level,
        transformer_layers_per_block=[max(d, 1) for d in depths],
        attention_head_dim=[max(1, c // HEAD_WIDTH) for c in channels],  # diffusers' name for SDXL's head count
        cross_attention_dim=shapes[attn][1],
        use_linear_projection=len(shapes[attn.split("transformer_blocks")[0] + "proj_in.weight"]) == 2,
        norm_num_groups=_groups(channels, config["norm_num_groups"]),
        projection_class_embeddings_input_dim=adm,
        addition_time_embed_dim=(adm - pooled_dim) // 6,  # six size/crop numbers plus the pooled text
    )
    return config


def vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config from the VAE's shapes (keyed without prefix)."""
    levels = _count(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    config = _template("vae")
    config.update(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels,
        layers_per_block=_count(shapes, "encoder.down.0.block."),
        latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
        norm_num_groups=_groups(channels, config["norm_num_groups"]),
    )
    return config


def _text_config(name: str, width: int, vocab: int, positions: int, layers: int, ffn: int, proj: int) -> dict:
    config = _template(name)
    config.update(
        vocab_size=vocab, hidden_size=width, max_position_embeddings=positions, num_hidden_layers=layers,
        intermediate_size=ffn, num_attention_heads=max(1, width // HEAD_WIDTH), projection_dim=proj,
    )  # fmt: skip
    return config


def clip_l_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    return _text_config(
        "clip_l", width, vocab, shapes["text_model.embeddings.position_embedding.weight"][0],
        _count(shapes, "text_model.encoder.layers."), shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0], width,
    )  # fmt: skip


def clip_g_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    vocab, width = shapes["token_embedding.weight"]
    return _text_config(
        "clip_g", width, vocab, shapes["positional_embedding"][0], _count(shapes, "transformer.resblocks."),
        shapes["transformer.resblocks.0.mlp.c_fc.weight"][0], shapes["text_projection"][1],
    )  # fmt: skip


@dataclass
class SDXLCheckpoint:
    """The parts of one checkpoint that were asked for (others ``None``) and what the file says about itself."""

    path: Path
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    file_dtype: torch.dtype = torch.float32


class CheckpointReader:
    """An open single-file checkpoint: its keys and shapes (header only) and tensors by prefix on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        if self.path.suffix.lower() != ".safetensors":
            raise NotSDXLError(f"{self.path.name}: only .safetensors checkpoints are read (never pickled .ckpt files)")
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise NotSDXLError(f"{self.path.name} is not a readable safetensors file ({err})") from None
        self.keys = list(self.handle.keys())
        identify(self.keys, self.path.name)

    def shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return {k[len(prefix):]: tuple(self.handle.get_slice(k).get_shape()) for k in self.keys if k.startswith(prefix)}

    def tensors(self, prefix: str, keep_prefix: bool = False) -> dict[str, torch.Tensor]:
        return {(k if keep_prefix else k[len(prefix):]): self.handle.get_tensor(k) for k in self.keys if k.startswith(prefix)}

    def prediction_type(self) -> str:
        """``v_prediction`` for files that carry a ``v_pred`` key (NoobAI-XL V-pred and kin), else ``epsilon``."""
        return "v_prediction" if "v_pred" in self.keys else "epsilon"

    def zero_terminal_snr(self) -> bool:
        """Whether the file carries a ``ztsnr`` key (NoobAI-XL V-pred: trained on a zero-terminal-SNR schedule)."""
        return "ztsnr" in self.keys

    def file_dtype(self) -> torch.dtype:
        """The UNet's storage type (fp16, bf16 or fp32; fp8 and others read as float32 for training)."""
        name = self.handle.get_slice(UNET + "input_blocks.0.0.weight").get_dtype()
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def _materialise(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> nn.Module:
    """Give a meta-device ``model`` the tensors of ``state`` (cast to ``dtype``); recompute CLIP's position ids."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    expected = set(model.state_dict())
    state = _match_text_model_prefix(state, expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    # transformers keeps position_ids as a buffer some versions save and others do not
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise NotSDXLError(f"{what}: the checkpoint does not fit SDXL's layout (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")  # fmt: skip
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{what}: buffer {name} was not in the checkpoint")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model.eval().requires_grad_(False)


def _match_text_model_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """transformers 4 names CLIP text weights ``text_model.*``, transformers 5 drops the prefix: follow the model."""
    prefix = "text_model."
    if any(k.startswith(prefix) for k in expected) or not any(k.startswith(prefix) for k in state):
        return state
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _build(factory: Any) -> nn.Module:
    with torch.device("meta"):
        return factory()


def load_sdxl(
    path: str | os.PathLike, parts: Iterable[str] = COMPONENTS, dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> SDXLCheckpoint:  # fmt: skip
    """Load ``parts`` (``"unet"``, ``"vae"``, ``"text"``: both text encoders) of an SDXL checkpoint on the CPU,
    the UNet and text encoders in ``dtype``, the VAE in ``vae_dtype`` (SDXL's VAE overflows in fp16)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    reader = CheckpointReader(path)
    parts = set(parts)
    unknown = parts - set(COMPONENTS)
    if unknown:
        raise ValueError(f"parts must be among {COMPONENTS}; got {sorted(unknown)}")
    out = SDXLCheckpoint(reader.path, prediction_type=reader.prediction_type(), file_dtype=reader.file_dtype(),
                         zero_terminal_snr=reader.zero_terminal_snr() and reader.prediction_type() == "v_prediction")
    if "unet" in parts:
        pooled = reader.shapes(CLIP_G)["text_projection"][1]
        config = unet_config(reader.shapes(UNET), pooled)
        state = sfu.convert_ldm_unet_checkpoint(reader.tensors(UNET, keep_prefix=True), config)
        out.unet = _materialise(_build(lambda: UNet2DConditionModel(**config)), state, dtype, "UNet")
    if "vae" in parts:
        config = vae_config(reader.shapes(VAE))
        state = sfu.convert_ldm_vae_checkpoint(reader.tensors(VAE, keep_prefix=True), config)
        out.vae = _materialise(_build(lambda: AutoencoderKL(**config)), state, vae_dtype, "VAE")
    if "text" in parts:
        config_l = CLIPTextConfig(**clip_l_config(reader.shapes(CLIP_L)))
        state = sfu.convert_ldm_clip_checkpoint(reader.tensors(CLIP_L, keep_prefix=True), CLIP_L)
        out.text_encoder = _materialise(_build(lambda: CLIPTextModel(config_l)), state, dtype, "text encoder 1")
        config_g = CLIPTextConfig(**clip_g_config(reader.shapes(CLIP_G)))
        te2 = _build(lambda: CLIPTextModelWithProjection(config_g))
        state = sfu.convert_open_clip_checkpoint(te2, reader.tensors(CLIP_G, keep_prefix=True), prefix=CLIP_G)
        state.pop("logit_scale", None)
        out.text_encoder_2 = _materialise(te2, state, dtype, "text encoder 2")
    return out
