"""SDXL name maps against diffusers' real SDXL UNet; the CLI's inspect, convert-peft and bake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from waveft_core import LayerAdapter, load_adapter, save_adapter
from waveft_core.cli import main
from waveft_core.names import (
    SDXL_DIFFUSERS_UNET,
    kohya_name,
    sdxl_attention_shapes,
    sdxl_kohya_table,
    sdxl_unet_linears,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)


@pytest.fixture(scope="module")
def sdxl_unet_linears_diffusers() -> dict[str, tuple[int, int]]:
    """Every Linear of diffusers' full-size SDXL UNet, built on the meta device (no memory, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_DIFFUSERS_UNET)
    return {n: (m.out_features, m.in_features) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}


def test_every_sdxl_unet_linear_maps_to_ldm_and_back(sdxl_unet_linears_diffusers):
    table = sdxl_unet_linears()
    assert len(sdxl_unet_linears_diffusers) == len(table)
    for name, shape in sdxl_unet_linears_diffusers.items():
        ldm = unet_diffusers_to_ldm(name)
        assert ldm in table, name
        assert table[ldm] == shape, name
        assert unet_ldm_to_diffusers(ldm) == name


def test_attention_table_is_the_papers_560_layers():
    shapes = sdxl_attention_shapes()
    assert len(shapes) == 560
    assert sum(o * i for o, i in shapes.values()) // 560 // 2592 > 0
    assert shapes["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (640, 2048)
    assert kohya_name("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")


def test_text_encoder_names_follow_kohya():
    table = sdxl_kohya_table()
    assert table["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == ("te1", "text_model.encoder.layers.11.mlp.fc2", (768, 3072))
    assert table["lora_te2_text_model_encoder_layers_31_self_attn_q_proj"][2] == (1280, 1280)
    assert sum(1 for k in table if k.startswith("lora_te1_")) == 12 * 6
    assert sum(1 for k in table if k.startswith("lora_te2_")) == 32 * 6 + 1


def _sample_adapter(tmp_path, prefixes=("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",)):
    table = sdxl_kohya_table()
    layers = {p: LayerAdapter(torch.randn(50), table[p][2], 25.0, "db1", seed=777) for p in prefixes}
    return save_adapter(tmp_path / "a.safetensors", layers)


def test_inspect_json(tmp_path, capsys):
    path = _sample_adapter(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 1 and info["total_parameters"] == 50 and info["wavelets"] == ["db1"]
    assert info["seeds"] == [777] and info["positions_stored"] == 0 and info["base_model"] == "sdxl_base_v1-0"


def test_inspect_bad_file_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["inspect", str(bad)]) == 2
    assert "error: bad.safetensors" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    path = _sample_adapter(tmp_path)
    result = subprocess.run([sys.executable, "-m", "waveft_core", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "parameters: 50" in result.stdout


class _Tree(torch.nn.Module):
    """Linear layers at real diffusers SDXL paths (a few of them), for PEFT to adapt."""

    def __init__(self, paths: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        for path, (out_features, in_features) in paths.items():
            parent = self
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, torch.nn.Linear(in_features, out_features))


@pytest.mark.parametrize("wavelet", ["db1", "db3"])
def test_convert_peft_gives_identical_dw(tmp_path, wavelet):
    from peft import WaveFTConfig, get_peft_model

    paths = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k": (1280, 2048),
        "mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0": (1280, 1280),
    }
    config = WaveFTConfig(n_frequency=300, scaling=12.0, wavelet_family=wavelet, random_loc_seed=5,
                          target_modules=["to_q", "to_k", "to_out.0"])
    model = get_peft_model(_Tree(paths), config)
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "waveft_spectrum") and "default" in getattr(module, "waveft_spectrum", {}):
            with torch.no_grad():
                module.waveft_spectrum["default"].normal_()
            expected[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    model.save_pretrained(tmp_path / "peft")
    assert main(["convert-peft", str(tmp_path / "peft"), str(tmp_path / "out.safetensors")]) == 0
    converted = load_adapter(tmp_path / "out.safetensors")
    assert len(converted.layers) == 3
    for name, dw in expected.items():
        layer = converted.layers[kohya_name("unet", unet_diffusers_to_ldm(name))]
        torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-5, atol=1e-5 * dw.abs().max().item())


def test_bake_merges_into_sgm_checkpoint(tmp_path):
    prefixes = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
                "lora_te2_text_projection")
    adapter = load_adapter(_sample_adapter(tmp_path, prefixes))
    checkpoint = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(640, 640).half(),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight": torch.randn(3840, 1280),
        "conditioner.embedders.1.model.text_projection": torch.randn(1280, 1280),
        "model.diffusion_model.out.2.bias": torch.randn(4),
    }
    save_file(checkpoint, str(tmp_path / "ckpt.safetensors"), metadata={"modelspec.title": "x"})
    assert main(["bake", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "a.safetensors"),
                 str(tmp_path / "baked.safetensors"), "--strength", "0.5"]) == 0
    baked = load_file(str(tmp_path / "baked.safetensors"))
    dws = {p: 0.5 * adapter.layers[p].delta_weight() for p in prefixes}
    unet_key, te1_key, te2_qkv, te2_proj = list(checkpoint)[:4]
    torch.testing.assert_close(baked[unet_key].float(), (checkpoint[unet_key].float() + dws[prefixes[0]]).half().float())
    torch.testing.assert_close(baked[te1_key], checkpoint[te1_key] + dws[prefixes[1]])
    torch.testing.assert_close(baked[te2_qkv][2560:], checkpoint[te2_qkv][2560:] + dws[prefixes[2]])
    torch.testing.assert_close(baked[te2_qkv][:2560], checkpoint[te2_qkv][:2560])
    torch.testing.assert_close(baked[te2_proj], checkpoint[te2_proj] + dws[prefixes[3]].T)
    assert torch.equal(baked["model.diffusion_model.out.2.bias"], checkpoint["model.diffusion_model.out.2.bias"])


def test_cli_never_writes_over_its_inputs_and_asks_before_replacing_a_file(tmp_path, capsys):
    _sample_adapter(tmp_path, ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",))
    ckpt, adapter = str(tmp_path / "ckpt.safetensors"), str(tmp_path / "a.safetensors")
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(640, 640)}, ckpt)
    original = (tmp_path / "ckpt.safetensors").read_bytes()
    assert main(["bake", ckpt, adapter, ckpt, "--overwrite"]) == 2  # the base model itself: never
    assert "is also an input" in capsys.readouterr().err and (tmp_path / "ckpt.safetensors").read_bytes() == original
    out = tmp_path / "baked.safetensors"
    out.write_bytes(b"keep me")
    assert main(["bake", ckpt, adapter, str(out)]) == 2 and out.read_bytes() == b"keep me"
    assert "exists: choose another name or pass --overwrite" in capsys.readouterr().err
    assert main(["bake", ckpt, adapter, str(out), "--overwrite"]) == 0 and out.read_bytes() != b"keep me"
    assert main(["convert-peft", str(tmp_path), str(out)]) == 2 and "exists" in capsys.readouterr().err


def test_bake_refuses_when_a_layer_is_missing(tmp_path, capsys):
    _sample_adapter(tmp_path)
    save_file({"model.diffusion_model.out.2.bias": torch.randn(4)}, str(tmp_path / "ckpt.safetensors"))
    assert main(["bake", str(tmp_path / "ckpt.safetensors"), str(tmp_path / "a.safetensors"),
                 str(tmp_path / "baked.safetensors")]) == 2
    assert "no weight for 1 adapter layer" in capsys.readouterr().err
    assert not (tmp_path / "baked.safetensors").exists()


@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.waveft_spectrum":
          torch.full((10,), float("nan"))}, "NaN or Inf"),
        ({"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.waveft_spectrum":
          torch.zeros(640 * 640 + 1)}, "coefficients for a 640x640"),
        ({"base_model.model.conv_in.waveft_spectrum": torch.zeros(3)}, "not a Linear of the SDXL UNet"),
        ({"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A": torch.zeros(3)},
         "not a WaveFT spectrum"),
    ],
)
def test_convert_peft_refuses_bad_folders(tmp_path, capsys, tensors, message):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "WAVEFT"}))
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert main(["convert-peft", str(tmp_path / "peft"), str(tmp_path / "out.safetensors")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_escapes_names_and_reports_os_errors_without_a_traceback(tmp_path, capsys, monkeypatch):
    def layer():
        return LayerAdapter(torch.randn(8), (16, 12), 25.0, "db1", seed=1)

    path = save_adapter(tmp_path / "odd.safetensors", {"nounderscore": layer(), "lora_unet_\x1b[31mred\nx": layer()},
                        {"ss_base_model_version": "sdxl\x1b]0;pwned\x07"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    import waveft_core.cli as cli

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "convert_peft", full_disk)
    assert main(["convert-peft", str(tmp_path), str(tmp_path / "out.safetensors")]) == 2
    assert "error: [Errno 28] No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("strength", ["nan", "inf", "-1e9"])
def test_bake_refuses_a_strength_that_is_not_a_finite_slider_value(tmp_path, capsys, strength):
    _sample_adapter(tmp_path)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(640, 640)}, str(ckpt))
    assert main(["bake", str(ckpt), str(tmp_path / "a.safetensors"), str(tmp_path / "out.safetensors"), f"--strength={strength}"]) == 2
    assert "must be a finite number" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


def test_bake_refuses_to_write_inf_into_an_fp16_checkpoint(tmp_path, capsys):
    prefix = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    layer = LayerAdapter(torch.full((50,), 9000.0 / 25.0), (640, 640), 25.0, "db1", seed=777)  # within the file bound
    save_adapter(tmp_path / "a.safetensors", {prefix: layer})
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(640, 640).half()}, str(ckpt))
    assert main(["bake", str(ckpt), str(tmp_path / "a.safetensors"), str(tmp_path / "out.safetensors"), "--strength", "100"]) == 2
    assert "would hold Inf or NaN" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()
