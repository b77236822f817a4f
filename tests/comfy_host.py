"""A real ComfyUI, headless on the CPU, for the ``test_comfy_*`` host tests (``COMFYUI_PATH`` = a checkout).

Builds small models with ComfyUI's own classes: an SDXL-layout UNet (SDXL's block structure, 32 base channels,
one transformer per attention block), a random TAESD VAE and a two-encoder stand-in CLIP with SDXL's key
names and output shapes; loads this repository as a custom-node pack the way ComfyUI does.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
TOKENS = 8  # text tokens of the stand-in CLIP: few, because the CPU time goes into attn2's to_k / to_v
SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout (and use a venv with its requirements) to run the host tests"

TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64, "adm_in_channels": 2816,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
}  # fmt: skip


# three SDXL attention projections of the tiny model, by ldm name (two layer shapes, a middle-block one)
Q4 = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
K2 = "middle_block.1.transformer_blocks.0.attn2.to_k"
OUT = "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0"


def weight_key(name: str) -> str:
    """The model state-dict key of an ldm layer name."""
    return f"diffusion_model.{name}.weight"


def require_comfy() -> None:
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON, allow_module_level=True)


_STATE: dict[str, object] = {}

TEST_PACK = """
import torch
from comfy_api.latest import ComfyExtension, io

import comfy_host


class TinyModels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="WaveFTTestTinyModels", category="testing", inputs=[io.Int.Input("seed", default=0)],
                         outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, seed):
        return io.NodeOutput(comfy_host.tiny_sdxl(seed), comfy_host.tiny_clip(), comfy_host.tiny_vae())


class TinyImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="WaveFTTestImages", category="testing", inputs=[],
                         outputs=[io.Image.Output(is_output_list=True)])

    @classmethod
    def execute(cls):
        g = torch.Generator().manual_seed(3)
        return io.NodeOutput([torch.rand(2, 40, 40, 3, generator=g), torch.rand(1, 24, 56, 3, generator=g)])


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [TinyModels, TinyImages]


def comfy_entrypoint():
    return Extension()
"""


def boot() -> dict[str, object]:
    """Import ComfyUI once (CPU mode, temporary model/input/output folders) and load this pack into it."""
    if _STATE:
        return _STATE
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)  # before the repository root: ComfyUI's nodes.py, not our nodes/
    from comfy.cli_args import args

    args.cpu = True
    args.disable_metadata = True
    import comfy.model_management  # noqa: F401  (CPU mode is fixed at this import)
    import folder_paths
    import utils.extra_config  # noqa: F401  (must precede `import nodes`, as in ComfyUI's main.py)

    import nodes

    work = Path(tempfile.mkdtemp(prefix="waveft_comfy_"))
    atexit.register(_cleanup, work)
    folder_paths.models_dir = str(work / "models")
    for name in ("loras", "checkpoints"):
        folder_paths.folder_names_and_paths[name] = ([str(work / "models" / name)], folder_paths.supported_pt_extensions)
        (work / "models" / name).mkdir(parents=True)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_input_directory(str(work / "input"))
    (work / "input").mkdir()
    custom = work / "custom_nodes"
    custom.mkdir()
    (custom / "comfyui-waveft").symlink_to(ROOT, target_is_directory=True)  # a folder name with '-'
    pack_path = str(custom / "comfyui-waveft")
    (custom / "waveft_test_models").mkdir()
    (custom / "waveft_test_models" / "__init__.py").write_text(TEST_PACK)
    for path in (pack_path, str(custom / "waveft_test_models")):
        ok = asyncio.run(nodes.load_custom_node(path, ignore=set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
        assert ok, f"ComfyUI could not load {path} (see the log above)"
    _STATE.update(work=work, nodes=nodes, folder_paths=folder_paths, pack=sys.modules[pack_path.replace(".", "_x_")])
    return _STATE


def _cleanup(work: Path) -> None:
    link = work / "custom_nodes" / "comfyui-waveft"
    if link.is_symlink():
        link.unlink()  # the repository itself must never be touched
    shutil.rmtree(work, ignore_errors=True)


def pack_module(name: str) -> ModuleType:
    """A submodule of the pack as ComfyUI loaded it, e.g. ``pack_module("nodes.comfy_patching")``."""
    import importlib

    return importlib.import_module(f"{boot()['pack'].__name__}.{name}")


def fill_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Deterministic weights (comfy ops skip initialisation): norms near 1, everything else small noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return module


def tiny_sdxl(seed: int = 0, dtype: torch.dtype | None = None, manual_cast: torch.dtype | None = None):
    """A ``ModelPatcher`` around an SDXL-architecture UNet (10.8M parameters; SDXL key names and layout), with
    weights in ``dtype`` and, with ``manual_cast``, computing in that (ComfyUI's manual-cast models)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_SDXL))
    if dtype is not None:
        config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({})
    fill_(model.diffusion_model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    # newer ComfyUI rebuilds a model from its loader for deep clones (the core trainer's clone(force_deepcopy))
    patcher.cached_patcher_init = (_tiny_sdxl_again, (seed, dtype, manual_cast))
    return patcher


def _tiny_sdxl_again(seed: int, dtype, manual_cast, disable_dynamic: bool = False):
    return tiny_sdxl(seed, dtype, manual_cast)


class TinyTokenizer:
    """Stand-in for SDXL's tokenizer: one "token" per word, hashed."""

    def __init__(self, embedding_directory=None, tokenizer_data=None) -> None:
        pass

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        ids = [sum(map(ord, word)) % 97 for word in text.split()] or [0]
        return {"l": [[(i, 1.0) for i in ids]], "g": [[(i, 1.0) for i in ids]]}

    def untokenize(self, pairs):
        return pairs

    def state_dict(self):
        return {}


class TinyClipModel(torch.nn.Module):
    """Two text encoders with SDXL's key names (``clip_l`` / ``clip_g``, one layer each, width 16)."""

    def __init__(self, device="cpu", dtype=None, model_options=None) -> None:
        super().__init__()
        self.dtypes = {torch.float32}
        for side in ("clip_l", "clip_g"):
            encoder = torch.nn.Module()
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.ModuleDict({p: torch.nn.Linear(16, 16) for p in ("q_proj", "k_proj", "v_proj", "out_proj")})
            layer.mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(16, 64), "fc2": torch.nn.Linear(64, 16)})
            encoder.layers = torch.nn.ModuleList([layer])
            text_model = torch.nn.Module()
            text_model.encoder = encoder
            transformer = torch.nn.Module()
            transformer.text_model = text_model
            side_module = torch.nn.Module()
            side_module.transformer = transformer
            self.add_module(side, side_module)
        self.embed = torch.nn.Embedding(97, 16)
        fill_(self, 1, 0.3)

    def set_clip_options(self, options) -> None:
        pass

    def reset_clip_options(self) -> None:
        pass

    def _encode(self, side: str, ids: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, side).transformer.text_model.encoder.layers[0]
        h = self.embed(ids)
        h = h + layer.self_attn["out_proj"](layer.self_attn["q_proj"](h) * layer.self_attn["v_proj"](h))
        return h + layer.mlp["fc2"](torch.tanh(layer.mlp["fc1"](h)))

    def encode_token_weights(self, tokens):
        ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
        h = torch.cat([self._encode("clip_l", ids), self._encode("clip_g", ids)], dim=-1)  # [1, T, 32]
        tokens = torch.nn.functional.pad(h, (0, 0, 0, TOKENS - h.shape[1]))
        cond = tokens.repeat(1, 1, 64)  # [1, TOKENS, 2048] like CLIP-L ++ CLIP-G (77 tokens there)
        pooled = h.mean(dim=1).repeat(1, 40)  # [1, 1280]
        return cond, pooled


def tiny_clip():
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(TinyTokenizer, TinyClipModel)
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


def small_sdxl_clip(seed: int = 0):
    """ComfyUI's real SDXL CLIP classes (tokenizer, CLIP-L, CLIP-G, manual-cast fp16 weights, in-place
    residuals) cut to three layers each, random weights: what WaveFT Train meets in a real install."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    small = {"num_hidden_layers": 3, "intermediate_size": 64}  # 3: SDXL reads the penultimate layer
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float16, "clip_l_model_config": small, "clip_g_model_config": small})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clip.cond_stage_model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:  # norms' weights one, biases zero
                param.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
    return clip


def tiny_vae():
    import comfy.sd
    import comfy.taesd.taesd

    taesd = fill_(comfy.taesd.taesd.TAESD(latent_channels=4), 2)
    return comfy.sd.VAE(sd=taesd.state_dict())


class StubServer:
    """What ``execution.PromptExecutor`` touches on ComfyUI's server."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_prompt(prompt: dict) -> tuple[object, StubServer]:
    """Validate and execute an API-format prompt like ComfyUI's server does; returns the executor."""
    import execution

    valid = asyncio.run(execution.validate_prompt("waveft-test", prompt, None))
    assert valid[0], valid
    server = StubServer()
    kwargs = {}
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}  # newer ComfyUI reads these at execute
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, **kwargs)
    executor.execute(prompt, "waveft-test", extra_data={}, execute_outputs=valid[2])
    return executor, server
