"""Write a small random SDXL single-file checkpoint (real SDXL key names, seeded, fp16).

Hosts that build models from the state dict (Forge Neo's huggingface_guess, ComfyUI's model detection) read
an SDXL UNet from its shapes: model_channels 320, transformer depth [0, 0, 2, 2, 10, 10], context 2048 and
adm 2816 are what they match on. The channel multipliers are read from the shapes too, so this UNet keeps all
of SDXL's blocks but uses ``--channel-mult 1,1,1`` (every level 320 wide, ~0.25 B parameters instead of 2.6 B).
The text encoders (CLIP ViT-L, OpenCLIP bigG) and the VAE are full size: the hosts build those from shipped
configs. Weights are N(0, 1/fan_in), norms 1, biases 0, so a random model gives a varied (noisy) image.

    python tests/forge_neo_make_model.py OUT.safetensors [--seed 0] [--channel-mult 1,1,1] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import save_file


class Builder:
    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.sd: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def rand(self, key: str, shape: tuple[int, ...], std: float) -> None:
        self.sd[key] = (torch.randn(shape, generator=self.gen) * std).to(self.dtype)

    def const(self, key: str, shape: tuple[int, ...], value: float) -> None:
        self.sd[key] = torch.full(shape, value, dtype=self.dtype)

    def linear(self, key: str, n_in: int, n_out: int, bias: bool = True) -> None:
        self.rand(f"{key}.weight", (n_out, n_in), 1 / math.sqrt(n_in))
        if bias:
            self.const(f"{key}.bias", (n_out,), 0.0)

    def conv(self, key: str, n_in: int, n_out: int, k: int = 3) -> None:
        self.rand(f"{key}.weight", (n_out, n_in, k, k), 1 / math.sqrt(n_in * k * k))
        self.const(f"{key}.bias", (n_out,), 0.0)

    def norm(self, key: str, n: int) -> None:
        self.const(f"{key}.weight", (n,), 1.0)
        self.const(f"{key}.bias", (n,), 0.0)


# ---------------------------------------------------------------- UNet (sgm/ldm "openaimodel" names)


def resblock(b: Builder, key: str, n_in: int, n_out: int, emb: int) -> None:
    b.norm(f"{key}.in_layers.0", n_in)
    b.conv(f"{key}.in_layers.2", n_in, n_out)
    b.linear(f"{key}.emb_layers.1", emb, n_out)
    b.norm(f"{key}.out_layers.0", n_out)
    b.conv(f"{key}.out_layers.3", n_out, n_out)
    if n_in != n_out:
        b.conv(f"{key}.skip_connection", n_in, n_out, k=1)


def transformer(b: Builder, key: str, dim: int, depth: int, context: int) -> None:
    b.norm(f"{key}.norm", dim)
    b.linear(f"{key}.proj_in", dim, dim)
    for i in range(depth):
        t = f"{key}.transformer_blocks.{i}"
        for attn, kv_dim in (("attn1", dim), ("attn2", context)):
            b.linear(f"{t}.{attn}.to_q", dim, dim, bias=False)
            b.linear(f"{t}.{attn}.to_k", kv_dim, dim, bias=False)
            b.linear(f"{t}.{attn}.to_v", kv_dim, dim, bias=False)
            b.linear(f"{t}.{attn}.to_out.0", dim, dim)
        b.linear(f"{t}.ff.net.0.proj", dim, dim * 8)  # GEGLU
        b.linear(f"{t}.ff.net.2", dim * 4, dim)
        for n in (1, 2, 3):
            b.norm(f"{t}.norm{n}", dim)
    b.linear(f"{key}.proj_out", dim, dim)


def sdxl_unet(b: Builder, channel_mult: list[int], prefix: str = "model.diffusion_model.") -> None:
    ch, emb, context, adm = 320, 1280, 2048, 2816
    depths = [0, 2, 10]  # transformer blocks per attention layer at each level (SDXL)
    assert len(channel_mult) == 3
    b.linear(f"{prefix}time_embed.0", ch, emb)
    b.linear(f"{prefix}time_embed.2", emb, emb)
    b.linear(f"{prefix}label_emb.0.0", adm, emb)
    b.linear(f"{prefix}label_emb.0.2", emb, emb)
    b.conv(f"{prefix}input_blocks.0.0", 4, ch)
    skips, cur, index = [ch], ch, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(2):
            out = ch * mult
            resblock(b, f"{prefix}input_blocks.{index}.0", cur, out, emb)
            if depths[level]:
                transformer(b, f"{prefix}input_blocks.{index}.1", out, depths[level], context)
            cur = out
            skips.append(cur)
            index += 1
        if level != len(channel_mult) - 1:
            b.conv(f"{prefix}input_blocks.{index}.0.op", cur, cur)
            skips.append(cur)
            index += 1
    resblock(b, f"{prefix}middle_block.0", cur, cur, emb)
    transformer(b, f"{prefix}middle_block.1", cur, depths[-1], context)
    resblock(b, f"{prefix}middle_block.2", cur, cur, emb)
    index = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(3):
            out = ch * channel_mult[level]
            resblock(b, f"{prefix}output_blocks.{index}.0", cur + skips.pop(), out, emb)
            cur, sub = out, 1
            if depths[level]:
                transformer(b, f"{prefix}output_blocks.{index}.1", out, depths[level], context)
                sub = 2
            if level and i == 2:
                b.conv(f"{prefix}output_blocks.{index}.{sub}.conv", cur, cur)
            index += 1
    b.norm(f"{prefix}out.0", cur)
    b.conv(f"{prefix}out.2", cur, 4)


# ---------------------------------------------------------------- text encoders


def clip_l(b: Builder, prefix: str = "conditioner.embedders.0.transformer.text_model.") -> None:
    """CLIP ViT-L/14 text model, Hugging Face transformers names (as in SDXL single files)."""
    d, layers, vocab, ctx = 768, 12, 49408, 77
    b.rand(f"{prefix}embeddings.token_embedding.weight", (vocab, d), 0.02)
    b.rand(f"{prefix}embeddings.position_embedding.weight", (ctx, d), 0.01)
    for i in range(layers):
        layer = f"{prefix}encoder.layers.{i}"
        for p in ("q", "k", "v", "out"):
            b.linear(f"{layer}.self_attn.{p}_proj", d, d)
        b.norm(f"{layer}.layer_norm1", d)
        b.norm(f"{layer}.layer_norm2", d)
        b.linear(f"{layer}.mlp.fc1", d, 4 * d)
        b.linear(f"{layer}.mlp.fc2", 4 * d, d)
    b.norm(f"{prefix}final_layer_norm", d)


def clip_g(b: Builder, prefix: str = "conditioner.embedders.1.model.") -> None:
    """OpenCLIP ViT-bigG/14 text tower, open_clip names (fused in_proj, as in SDXL single files)."""
    d, layers, vocab, ctx = 1280, 32, 49408, 77
    b.rand(f"{prefix}token_embedding.weight", (vocab, d), 0.02)
    b.rand(f"{prefix}positional_embedding", (ctx, d), 0.01)
    for i in range(layers):
        r = f"{prefix}transformer.resblocks.{i}"
        b.rand(f"{r}.attn.in_proj_weight", (3 * d, d), 1 / math.sqrt(d))
        b.const(f"{r}.attn.in_proj_bias", (3 * d,), 0.0)
        b.linear(f"{r}.attn.out_proj", d, d)
        b.norm(f"{r}.ln_1", d)
        b.norm(f"{r}.ln_2", d)
        b.linear(f"{r}.mlp.c_fc", d, 4 * d)
        b.linear(f"{r}.mlp.c_proj", 4 * d, d)
    b.norm(f"{prefix}ln_final", d)
    b.rand(f"{prefix}text_projection", (d, d), 1 / math.sqrt(d))
    b.const(f"{prefix}logit_scale", (), math.log(100.0))


# ---------------------------------------------------------------- VAE (ldm names)


def vae_resnet(b: Builder, key: str, n_in: int, n_out: int) -> None:
    b.norm(f"{key}.norm1", n_in)
    b.conv(f"{key}.conv1", n_in, n_out)
    b.norm(f"{key}.norm2", n_out)
    b.conv(f"{key}.conv2", n_out, n_out)
    if n_in != n_out:
        b.conv(f"{key}.nin_shortcut", n_in, n_out, k=1)


def vae_mid(b: Builder, key: str, c: int) -> None:
    vae_resnet(b, f"{key}.block_1", c, c)
    b.norm(f"{key}.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        b.conv(f"{key}.attn_1.{p}", c, c, k=1)
    vae_resnet(b, f"{key}.block_2", c, c)


def vae(b: Builder, prefix: str = "first_stage_model.") -> None:
    ch, mult, z = 128, [1, 2, 4, 4], 4
    e = f"{prefix}encoder"
    b.conv(f"{e}.conv_in", 3, ch)
    cur = ch
    for level, m in enumerate(mult):
        for i in range(2):
            vae_resnet(b, f"{e}.down.{level}.block.{i}", cur, ch * m)
            cur = ch * m
        if level != len(mult) - 1:
            b.conv(f"{e}.down.{level}.downsample.conv", cur, cur)
    vae_mid(b, f"{e}.mid", cur)
    b.norm(f"{e}.norm_out", cur)
    b.conv(f"{e}.conv_out", cur, 2 * z)
    b.conv(f"{prefix}quant_conv", 2 * z, 2 * z, k=1)
    b.conv(f"{prefix}post_quant_conv", z, z, k=1)
    d = f"{prefix}decoder"
    cur = ch * mult[-1]
    b.conv(f"{d}.conv_in", z, cur)
    vae_mid(b, f"{d}.mid", cur)
    for level in reversed(range(len(mult))):
        for i in range(3):
            vae_resnet(b, f"{d}.up.{level}.block.{i}", cur, ch * mult[level])
            cur = ch * mult[level]
        if level != 0:
            b.conv(f"{d}.up.{level}.upsample.conv", cur, cur)
    b.norm(f"{d}.norm_out", cur)
    b.conv(f"{d}.conv_out", cur, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channel-mult", default="1,1,1", help="UNet channel multipliers (SDXL: 1,2,4)")
    parser.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b = Builder(args.seed, dtype)
    sdxl_unet(b, [int(v) for v in args.channel_mult.split(",")])
    clip_l(b)
    clip_g(b)
    vae(b)
    save_file(b.sd, args.out, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    params = sum(t.numel() for t in b.sd.values())
    print(f"{args.out}: {len(b.sd)} tensors, {params / 1e6:.1f} M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
