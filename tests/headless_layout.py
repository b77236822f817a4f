"""A cut-down SDXL single-file checkpoint with the real key names (A1111 / ComfyUI layout), for the headless
trainer's tests. Written from SDXL's ldm structure here, independently of the loader: the UNet
(``model.diffusion_model.*``: three levels, two ResBlocks each, transformer depth 0/1/1, middle block), the VAE
(``first_stage_model.*``, four levels, so latents are 1/8 of the image like SDXL's), CLIP-L in Hugging Face
names (``conditioner.embedders.0.transformer.text_model.*``) and OpenCLIP bigG in OpenCLIP names
(``conditioner.embedders.1.model.*``: ``in_proj_weight``, ``text_projection``, ``ln_final`` ...). All widths
are tiny; the vocabulary is CLIP's real 49408 tokens so the shipped tokenizer's ids fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, TOKENS = 49408, 77
CH, TEXT_L, TEXT_G, TIME = 32, 32, 32, 8  # UNet base width, text widths, size-embedding width


class _Writer:
    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, key: str, *shape: int, norm: bool = False) -> None:
        if norm:  # norm weights near 1, biases near 0, or the tiny model's output collapses
            value = 1 + 0.05 * torch.randn(shape, generator=self.gen) if key.endswith("weight") else torch.zeros(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            value = torch.randn(shape, generator=self.gen) / fan_in**0.5 * (1.0 if len(shape) > 1 else 0.02)
        self.tensors[key] = value

    def linear(self, key: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(key + ".weight", out, inp)
        if bias:
            self.add(key + ".bias", out)

    def conv(self, key: str, out: int, inp: int, k: int = 3) -> None:
        self.add(key + ".weight", out, inp, k, k)
        self.add(key + ".bias", out)

    def norm(self, key: str, dim: int) -> None:
        self.add(key + ".weight", dim, norm=True)
        self.add(key + ".bias", dim, norm=True)


def _resblock(w: _Writer, key: str, inp: int, out: int, emb: int) -> None:
    w.norm(f"{key}.in_layers.0", inp)
    w.conv(f"{key}.in_layers.2", out, inp)
    w.linear(f"{key}.emb_layers.1", out, emb)
    w.norm(f"{key}.out_layers.0", out)
    w.conv(f"{key}.out_layers.3", out, out)
    if inp != out:
        w.conv(f"{key}.skip_connection", out, inp, 1)


def _transformer(w: _Writer, key: str, dim: int, context: int, depth: int) -> None:
    w.norm(f"{key}.norm", dim)
    w.linear(f"{key}.proj_in", dim, dim)
    for b in range(depth):
        blk = f"{key}.transformer_blocks.{b}"
        for attn, kv in (("attn1", dim), ("attn2", context)):
            w.linear(f"{blk}.{attn}.to_q", dim, dim, bias=False)
            w.linear(f"{blk}.{attn}.to_k", dim, kv, bias=False)
            w.linear(f"{blk}.{attn}.to_v", dim, kv, bias=False)
            w.linear(f"{blk}.{attn}.to_out.0", dim, dim)
        w.linear(f"{blk}.ff.net.0.proj", 8 * dim, dim)  # GEGLU: value and gate
        w.linear(f"{blk}.ff.net.2", dim, 4 * dim)
        for n in (1, 2, 3):
            w.norm(f"{blk}.norm{n}", dim)
    w.linear(f"{key}.proj_out", dim, dim)


def write_unet(w: _Writer, prefix: str = "model.diffusion_model.") -> None:
    """SDXL's UNet: channel multipliers (1, 2, 4), two ResBlocks per level, transformer depth (0, 1, 1)."""
    chans, depth, emb, context = (CH, 2 * CH, 4 * CH), (0, 1, 1), 4 * CH, TEXT_L + TEXT_G
    w.linear(prefix + "time_embed.0", emb, CH)
    w.linear(prefix + "time_embed.2", emb, emb)
    w.linear(prefix + "label_emb.0.0", emb, 6 * TIME + TEXT_G)
    w.linear(prefix + "label_emb.0.2", emb, emb)
    w.conv(prefix + "input_blocks.0.0", CH, 4)
    skips, block, current = [CH], 1, CH
    for level, (ch, d) in enumerate(zip(chans, depth, strict=True)):
        for _ in range(2):
            _resblock(w, f"{prefix}input_blocks.{block}.0", current, ch, emb)
            if d:
                _transformer(w, f"{prefix}input_blocks.{block}.1", ch, context, d)
            current = ch
            skips.append(ch)
            block += 1
        if level < 2:
            w.conv(f"{prefix}input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            block += 1
    _resblock(w, prefix + "middle_block.0", current, current, emb)
    _transformer(w, prefix + "middle_block.1", current, context, depth[-1])
    _resblock(w, prefix + "middle_block.2", current, current, emb)
    block = 0
    for level, (ch, d) in enumerate(zip(reversed(chans), reversed(depth), strict=True)):
        for i in range(3):
            key = f"{prefix}output_blocks.{block}"
            _resblock(w, key + ".0", current + skips.pop(), ch, emb)
            current = ch
            if d:
                _transformer(w, key + ".1", ch, context, d)
            if i == 2 and level < 2:
                w.conv(f"{key}.{2 if d else 1}.conv", ch, ch)
            block += 1
    w.norm(prefix + "out.0", CH)
    w.conv(prefix + "out.2", 4, CH)


def write_vae(w: _Writer, prefix: str = "first_stage_model.", chans: tuple[int, ...] = (8, 8, 16, 16)) -> None:
    def block(key: str, inp: int, out: int) -> None:
        w.norm(key + ".norm1", inp)
        w.conv(key + ".conv1", out, inp)
        w.norm(key + ".norm2", out)
        w.conv(key + ".conv2", out, out)
        if inp != out:
            w.conv(key + ".nin_shortcut", out, inp, 1)

    def mid(key: str, ch: int) -> None:
        block(key + ".mid.block_1", ch, ch)
        w.norm(key + ".mid.attn_1.norm", ch)
        for name in ("q", "k", "v", "proj_out"):
            w.conv(f"{key}.mid.attn_1.{name}", ch, ch, 1)
        block(key + ".mid.block_2", ch, ch)

    enc, current = prefix + "encoder", chans[0]
    w.conv(enc + ".conv_in", chans[0], 3)
    for i, ch in enumerate(chans):
        for j in range(2):
            block(f"{enc}.down.{i}.block.{j}", current, ch)
            current = ch
        if i < len(chans) - 1:
            w.conv(f"{enc}.down.{i}.downsample.conv", ch, ch)
    mid(enc, current)
    w.norm(enc + ".norm_out", current)
    w.conv(enc + ".conv_out", 8, current)
    dec = prefix + "decoder"
    w.conv(dec + ".conv_in", current, 4)
    mid(dec, current)
    for i in reversed(range(len(chans))):  # ldm numbers decoder levels from the output side
        for j in range(3):
            block(f"{dec}.up.{i}.block.{j}", current, chans[i])
            current = chans[i]
        if i > 0:
            w.conv(f"{dec}.up.{i}.upsample.conv", current, current)
    w.norm(dec + ".norm_out", current)
    w.conv(dec + ".conv_out", 3, current)
    w.conv(prefix + "quant_conv", 8, 8, 1)
    w.conv(prefix + "post_quant_conv", 4, 4, 1)


def write_clip_l(w: _Writer, prefix: str = "conditioner.embedders.0.transformer.text_model.", layers: int = 2) -> None:
    w.add(prefix + "embeddings.token_embedding.weight", VOCAB, TEXT_L)
    w.add(prefix + "embeddings.position_embedding.weight", TOKENS, TEXT_L)
    for n in range(layers):
        layer = f"{prefix}encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w.linear(f"{layer}.self_attn.{proj}", TEXT_L, TEXT_L)
        w.norm(layer + ".layer_norm1", TEXT_L)
        w.linear(layer + ".mlp.fc1", 4 * TEXT_L, TEXT_L)
        w.linear(layer + ".mlp.fc2", TEXT_L, 4 * TEXT_L)
        w.norm(layer + ".layer_norm2", TEXT_L)
    w.norm(prefix + "final_layer_norm", TEXT_L)


def write_open_clip(w: _Writer, prefix: str = "conditioner.embedders.1.model.", layers: int = 2) -> None:
    w.add(prefix + "token_embedding.weight", VOCAB, TEXT_G)
    w.add(prefix + "positional_embedding", TOKENS, TEXT_G)
    for n in range(layers):
        block = f"{prefix}transformer.resblocks.{n}"
        w.add(block + ".attn.in_proj_weight", 3 * TEXT_G, TEXT_G)
        w.add(block + ".attn.in_proj_bias", 3 * TEXT_G)
        w.linear(block + ".attn.out_proj", TEXT_G, TEXT_G)
        w.norm(block + ".ln_1", TEXT_G)
        w.norm(block + ".ln_2", TEXT_G)
        w.linear(block + ".mlp.c_fc", 4 * TEXT_G, TEXT_G)
        w.linear(block + ".mlp.c_proj", TEXT_G, 4 * TEXT_G)
    w.norm(prefix + "ln_final", TEXT_G)
    w.add(prefix + "text_projection", TEXT_G, TEXT_G)  # [width, embed]: OpenCLIP multiplies x @ P
    w.tensors[prefix + "logit_scale"] = torch.tensor(4.6052)


def tiny_sdxl_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    w = _Writer(seed)
    write_unet(w)
    write_vae(w)
    write_clip_l(w)
    write_open_clip(w)
    return w.tensors


def write_tiny_sdxl(path: Path, dtype: torch.dtype = torch.float32, v_pred: bool = False, seed: int = 0) -> Path:
    """Write the cut-down checkpoint to ``path`` (floating tensors in ``dtype``)."""
    tensors = {k: v.to(dtype) for k, v in tiny_sdxl_tensors(seed).items()}
    if v_pred:  # what NoobAI-XL V-pred and other v-prediction SDXL files carry
        tensors["v_pred"] = torch.tensor([])
    save_file(tensors, str(path))
    return path
