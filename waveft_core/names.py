"""SDXL layer names in the three spellings users meet, and the maps between them.

* ldm/sgm (what ComfyUI and A1111 hold): ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``;
* diffusers (what PEFT saves): ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``;
* kohya (adapter-file prefixes): ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, and
  ``lora_te1_`` / ``lora_te2_`` + the Hugging Face path of CLIP-L / OpenCLIP bigG
  (``text_model.encoder.layers.0.self_attn.q_proj``).

SDXL block layout: diffusers ``down_blocks.i.{resnets,attentions}.j`` is ldm ``input_blocks.(3i+j+1).{0,1}``;
``mid_block.attentions.0`` is ``middle_block.1``, ``mid_block.resnets.j`` is ``middle_block.(2j)``;
``up_blocks.i.{resnets,attentions}.j`` is ``output_blocks.(3i+j).{0,1}``.
"""

from __future__ import annotations

import functools
import re

KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te": "lora_te_"}  # te: SD1's one encoder

# diffusers ``UNet2DConditionModel(**SDXL_DIFFUSERS_UNET)`` is SDXL's UNet (random weights): tests and benchmarks
SDXL_DIFFUSERS_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip

# level -> (channels, transformer depth) of SDXL's attention levels; level 0 has no attention
_SDXL_DOWN = {1: (640, 2), 2: (1280, 10)}
_SDXL_UP = {0: (1280, 10), 1: (640, 2)}
_ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_SIMPLE = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def kohya_name(component: str, module_path: str) -> str:
    """``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` (``lora_te_`` for SD1) + the module path, ``.`` -> ``_``."""
    if component not in KOHYA_PREFIX:
        raise ValueError(f"component must be one of {sorted(KOHYA_PREFIX)}, got {component!r}")
    return KOHYA_PREFIX[component] + module_path.replace(".", "_")


def _diffusers_block_to_ldm(kind: str, i: int, sub: str, j: int) -> str:
    slot = "1" if sub == "attentions" else "0"
    if kind == "down_blocks":
        return f"input_blocks.{3 * i + j + 1}.{slot}"
    return f"output_blocks.{3 * i + j}.{slot}"


_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_MID_BLOCK = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.([01])\.(.+)$")
_LDM_MID = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_RESNET_RENAMES = (("time_emb_proj", "emb_layers.1"),)


def _rename_inside(rest: str, is_resnet: bool, to_ldm: bool) -> str:
    if not is_resnet:
        return rest
    for diffusers, ldm in _RESNET_RENAMES:
        source, target = (diffusers, ldm) if to_ldm else (ldm, diffusers)
        if rest == source:
            return target
    return rest


def unet_diffusers_to_ldm(name: str) -> str | None:
    """ldm path of an SDXL UNet module given its diffusers path (``None`` if it has no ldm Linear twin)."""
    name = name.removeprefix("unet.")
    if name in _UNET_SIMPLE:
        return _UNET_SIMPLE[name]
    if match := _DIFFUSERS_BLOCK.match(name):
        kind, i, sub, j, rest = match.groups()
        block = _diffusers_block_to_ldm(kind, int(i), sub, int(j))
        return f"{block}.{_rename_inside(rest, sub == 'resnets', True)}"
    if match := _MID_BLOCK.match(name):
        sub, j, rest = match.groups()
        block = "middle_block.1" if sub == "attentions" else f"middle_block.{2 * int(j)}"
        return f"{block}.{_rename_inside(rest, sub == 'resnets', True)}"
    return None


def unet_ldm_to_diffusers(name: str) -> str | None:
    """Inverse of :func:`unet_diffusers_to_ldm` for SDXL (``None`` if the path is not an SDXL module)."""
    name = name.removeprefix("diffusion_model.").removeprefix("model.diffusion_model.")
    simple = {ldm: diffusers for diffusers, ldm in _UNET_SIMPLE.items()}
    if name in simple:
        return simple[name]
    if match := _LDM_BLOCK.match(name):
        kind, index, slot, rest = match.groups()
        index = int(index) - (1 if kind == "input_blocks" else 0)
        sub = "attentions" if slot == "1" else "resnets"
        block = "down_blocks" if kind == "input_blocks" else "up_blocks"
        if index < 0:
            return None
        return f"{block}.{index // 3}.{sub}.{index % 3}.{_rename_inside(rest, sub == 'resnets', False)}"
    if match := _LDM_MID.match(name):
        index, rest = int(match.group(1)), match.group(2)
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{index // 2}.{_rename_inside(rest, True, False)}"
    return None


def _transformer_linears(dim: int, depth: int) -> list[tuple[str, tuple[int, int]]]:
    out = [("proj_in", (dim, dim)), ("proj_out", (dim, dim))]
    for block in range(depth):
        prefix = f"transformer_blocks.{block}"
        for attn, context in (("attn1", dim), ("attn2", 2048)):
            for proj in _ATTN_PROJECTIONS:
                in_features = context if proj in ("to_k", "to_v") else dim
                out.append((f"{prefix}.{attn}.{proj}", (dim, in_features)))
        out += [(f"{prefix}.ff.net.0.proj", (8 * dim, dim)), (f"{prefix}.ff.net.2", (dim, 4 * dim))]
    return out


@functools.lru_cache(maxsize=1)
def sdxl_unet_linears() -> dict[str, tuple[int, int]]:
    """Every Linear of the SDXL base UNet: ldm path -> (out, in) (the real shapes)."""
    layers: dict[str, tuple[int, int]] = {}
    blocks = [(f"input_blocks.{3 * i + j + 1}.1", d) for i, (c, d) in _SDXL_DOWN.items() for j in range(2)]
    blocks += [("middle_block.1", 10)]
    blocks += [(f"output_blocks.{3 * i + j}.1", d) for i, (c, d) in _SDXL_UP.items() for j in range(3)]
    for block, depth in blocks:
        dim = 640 if depth == 2 else 1280
        for rest, shape in _transformer_linears(dim, depth):
            layers[f"{block}.{rest}"] = shape
    resnets = {f"input_blocks.{i}.0": c for i, c in zip((1, 2, 4, 5, 7, 8), (320, 320, 640, 640, 1280, 1280), strict=True)}
    resnets.update({"middle_block.0": 1280, "middle_block.2": 1280})
    resnets.update({f"output_blocks.{i}.0": (1280, 640, 320)[i // 3] for i in range(9)})
    for block, channels in resnets.items():
        layers[f"{block}.emb_layers.1"] = (channels, 1280)
    layers.update({"time_embed.0": (1280, 320), "time_embed.2": (1280, 1280)})
    layers.update({"label_emb.0.0": (1280, 2816), "label_emb.0.2": (1280, 1280)})
    return layers


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    """The paper's 560 adapted SDXL layers (attn1/attn2 ``to_q, to_k, to_v, to_out.0``) with their shapes."""
    pattern = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    return {name: shape for name, shape in sdxl_unet_linears().items() if pattern.search(name)}


@functools.lru_cache(maxsize=1)
def sdxl_text_encoder_linears() -> dict[str, tuple[str, tuple[int, int]]]:
    """Hugging Face paths of both SDXL text encoders' Linears: kohya name -> (component, path) and shape."""
    table: dict[str, tuple[str, tuple[int, int]]] = {}
    for component, layers, dim in (("te1", 12, 768), ("te2", 32, 1280)):
        for layer in range(layers):
            prefix = f"text_model.encoder.layers.{layer}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                table[f"{component}:{prefix}.self_attn.{proj}"] = (component, (dim, dim))
            table[f"{component}:{prefix}.mlp.fc1"] = (component, (4 * dim, dim))
            table[f"{component}:{prefix}.mlp.fc2"] = (component, (dim, 4 * dim))
    table["te2:text_projection"] = ("te2", (1280, 1280))
    return table


def sdxl_kohya_table() -> dict[str, tuple[str, str, tuple[int, int]]]:
    """kohya prefix -> (component, module path, shape) for every SDXL Linear: UNet (ldm paths) and both TEs."""
    table = {kohya_name("unet", path): ("unet", path, shape) for path, shape in sdxl_unet_linears().items()}
    for key, (component, shape) in sdxl_text_encoder_linears().items():
        path = key.split(":", 1)[1]
        table[kohya_name(component, path)] = (component, path, shape)
    return table


def peft_key_to_kohya(key: str) -> str | None:
    """kohya prefix for a PEFT/diffusers UNet module key (``base_model.model.down_blocks...to_q``)."""
    name = key.removeprefix("base_model.model.")
    ldm = unet_diffusers_to_ldm(name)
    return None if ldm is None else kohya_name("unet", ldm)


def printable(text: object) -> str:
    """``text`` with control characters escaped: layer names and metadata come from downloaded files, and an
    escape code or a newline must not reach a terminal or forge a host's log line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
