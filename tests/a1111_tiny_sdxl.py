"""A tiny SDXL-family checkpoint the real A1111 1.10 loads offline (for page tests of the WaveFT Train tab).

``write_tiny_sdxl(models_dir, name)`` writes ``<name>.safetensors`` with ``<name>.yaml`` beside it (A1111 uses a
``<checkpoint>.yaml`` next to a checkpoint as its config) and ``<name>_clip_l/`` (the first text encoder's
config and tokenizer, named by the yaml). The model keeps SDXL's architecture family -- sgm's
``DiffusionEngine`` with a two-text-encoder ``GeneralConditioner`` plus the three size embedders, a UNet with
``transformer_depth``/``context_dim``/``adm_in_channels`` and a transformer in ``middle_block.1`` (so A1111
sets ``is_sdxl`` and not ``is_ssd``), and a KL VAE with SDXL's 8x downsampling -- at tiny widths:

* text encoder 1: transformers ``CLIPTextModel`` with CLIP-L's tokenizer but width 64, 2 layers, 2 heads
  (``layer: hidden``, ``layer_idx: 1``: the penultimate layer, as SDXL's 11 of 12);
* text encoder 2: open_clip's builtin ``ViT-S-32-alt`` text tower (width 256, 10 layers, projection 256;
  ``version: null``, so nothing is downloaded; its visual tower is built and dropped, as for bigG);
* UNet: ``model_channels`` 32, ``channel_mult`` [1, 2], ``num_res_blocks`` 2, attention at level 1 only
  (``attention_resolutions`` [2], 64 channels, so every attention projection holds at least 64x64 = 4096
  weights, more than the tab's default budget 2592), ``transformer_depth`` [1, 2] (12 transformer blocks),
  ``context_dim`` 64 + 256 = 320, ``adm_in_channels`` 256 + 3 * 512 = 1792;
* VAE: ``ch`` 32, ``ch_mult`` [1, 1, 1, 1] (8x down), one res block per level.

The weights are seeded random ones made by sgm's own classes (the A1111 checkout's
``repositories/generative-models`` must be importable: give ``webui_root`` or set ``WEBUI_ROOT``; run it
with A1111's venv). The layers sgm initialises to zero (UNet output conv, ``proj_out``, the res blocks'
last conv) get small random values, so gradients reach the attention projections from the first step.
CLIP-L's tokenizer comes from the Hugging Face cache (``openai/clip-vit-large-patch14``, the same one
A1111 needs offline anyway; set ``HF_HOME``/``HF_HUB_OFFLINE=1``).

Usage: ``WEBUI_ROOT=/path/to/stable-diffusion-webui python tests/a1111_tiny_sdxl.py MODELS_DIR [--name N]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

CLIP_L_WIDTH = 64
OPEN_CLIP_ARCH, OPEN_CLIP_WIDTH, OPEN_CLIP_POOLED = "ViT-S-32-alt", 256, 256
CONTEXT_DIM = CLIP_L_WIDTH + OPEN_CLIP_WIDTH  # 320
ADM_IN_CHANNELS = OPEN_CLIP_POOLED + 3 * 2 * 256  # pooled + original size, crop, target size (256 each x 2)

YAML = """\
# Tiny SDXL-family model for tests (written by tests/a1111_tiny_sdxl.py): SDXL's classes, tiny widths.
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization

    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm_in_channels}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_head_channels: 32
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2]
        context_dim: {context_dim}
        spatial_transformer_attn_type: softmax
        legacy: False

    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: "{clip_l_dir}"
              layer: hidden
              layer_idx: 1
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: {open_clip_arch}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256

    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 1, 1]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def _generative_models(webui_root: str | Path | None) -> Path:
    root = webui_root or os.environ.get("WEBUI_ROOT")
    if not root:
        raise RuntimeError("give webui_root or set WEBUI_ROOT to an A1111 checkout (its sgm builds the model)")
    path = Path(root) / "repositories" / "generative-models"
    if not (path / "sgm").is_dir():
        raise RuntimeError(f"{path} has no sgm package (A1111's repositories/generative-models)")
    return path


def write_clip_l(directory: Path) -> Path:
    """CLIP-L's tokenizer (from the HF cache) with a tiny text-model config: what ``version:`` names."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14").save_pretrained(directory)
    CLIPTextConfig(
        vocab_size=49408,
        hidden_size=CLIP_L_WIDTH,
        intermediate_size=4 * CLIP_L_WIDTH,
        projection_dim=CLIP_L_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ).save_pretrained(directory)
    return directory


@contextlib.contextmanager
def _clip_text_model_from_config(encoders_module):
    """sgm calls ``CLIPTextModel.from_pretrained(version)``; our folder has a config but no weights."""
    original = encoders_module.CLIPTextModel
    text_model_class = original

    class FromConfig:
        @staticmethod
        def from_pretrained(path, *args, **kwargs):
            return text_model_class(text_model_class.config_class.from_pretrained(path))

    encoders_module.CLIPTextModel = FromConfig
    try:
        yield
    finally:
        encoders_module.CLIPTextModel = original


def _randomise_zero_weights(module, generator) -> int:
    """sgm's ``zero_module`` layers get small random values (else no gradient reaches the attention layers)."""
    import torch

    count = 0
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() >= 2 and not param.any():
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 / math.sqrt(fan_in)))
                count += 1
    return count


def write_tiny_sdxl(
    models_dir: Path,
    name: str = "tiny_sdxl",
    webui_root: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float16",
) -> Path:
    """Write ``<models_dir>/<name>.safetensors`` + ``<name>.yaml`` + ``<name>_clip_l/``; return the checkpoint."""
    models_dir = Path(models_dir).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    gm = str(_generative_models(webui_root))
    if gm not in sys.path:
        sys.path.insert(0, gm)

    import sgm.modules.encoders.modules as encoders
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from sgm.util import instantiate_from_config

    clip_l_dir = write_clip_l(models_dir / f"{name}_clip_l")
    yaml_path = models_dir / f"{name}.yaml"
    yaml_path.write_text(
        YAML.format(
            adm_in_channels=ADM_IN_CHANNELS,
            context_dim=CONTEXT_DIM,
            clip_l_dir=clip_l_dir.as_posix(),
            open_clip_arch=OPEN_CLIP_ARCH,
        )
    )

    config = OmegaConf.load(yaml_path)
    torch.manual_seed(seed)
    with _clip_text_model_from_config(encoders):
        model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(seed + 1)
    _randomise_zero_weights(model.model, generator)

    target = getattr(torch, dtype)
    state = {
        k: (v.to(target) if v.is_floating_point() else v).contiguous().clone() for k, v in model.state_dict().items()
    }
    path = models_dir / f"{name}.safetensors"
    # one metadata entry: safetensors writes a map's entries in random order, and A1111's model hash (the
    # file's sha256) should be the same for every write of the same seed
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--name", default="tiny_sdxl")
    parser.add_argument("--webui-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_sdxl(args.models_dir, args.name, args.webui_root, args.seed)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB), config {path.with_suffix('.yaml')}")


if __name__ == "__main__":
    main()
