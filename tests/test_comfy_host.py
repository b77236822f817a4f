"""The loader side of the ComfyUI pack against a real ComfyUI (``COMFYUI_PATH``): registration, exact patches
through the WaveFT nodes and the stock LoRA nodes, low-VRAM mode, unpatching, PEFT files, bad files, and a
whole prompt through ComfyUI's executor.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
from comfy_host import K2, OUT, Q4, boot, pack_module, require_comfy, run_prompt, tiny_clip, tiny_sdxl
from safetensors.torch import save_file

from waveft_core import LayerAdapter, save_adapter
from waveft_core.names import kohya_name, unet_ldm_to_diffusers

require_comfy()

UNET = "diffusion_model."
TE = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def host():
    return boot()


@pytest.fixture(scope="module")
def base():
    return tiny_sdxl(seed=0)


def _weight(model, key: str) -> torch.Tensor:
    return model.model.state_dict()[key].detach().clone()


def _layers(model, seed: int = 5) -> dict[str, LayerAdapter]:
    """Three UNet layers by ldm name (seeded and explicit positions, two wavelets), the tiny model's shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(_weight(model, _key(name)).shape) for name in (Q4, K2, OUT)}
    out_o, in_o = shapes[OUT]
    return {
        Q4: LayerAdapter(torch.randn(200, generator=g), shapes[Q4], 25.0, "db1", seed=777),
        K2: LayerAdapter(torch.randn(150, generator=g), shapes[K2], 10.0, "db2", seed=3),
        OUT: LayerAdapter(torch.randn(40, generator=g), shapes[OUT], 25.0, "db1", positions=torch.randperm(out_o * in_o, generator=g)[:40]),
    }


def _kohya(layers: dict[str, LayerAdapter]) -> dict[str, LayerAdapter]:
    return {kohya_name("unet", name): layer for name, layer in layers.items()}


def _key(name: str) -> str:
    return f"{UNET}{name}.weight"


def _loaded_weights(model, keys) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    with torch.inference_mode():  # as inside a node
        mm.load_models_gpu([model])
        weights = {key: _weight(model, key) for key in keys}
        mm.unload_all_models()
    return weights


def _save(host, folder: str, name: str, layers, **kwargs):
    path = host["work"] / "models" / folder / name
    save_adapter(path, layers, **kwargs)
    return path


def test_pack_loads_as_custom_node_and_registers_adapter_and_folder(host):
    import comfy.weight_adapter

    mappings = host["nodes"].NODE_CLASS_MAPPINGS
    for node_id in ("WaveFTLoader", "WaveFTLoaderModelOnly", "WaveFTApply", "WaveFTTrain", "WaveFTSave"):
        assert node_id in mappings, node_id
        assert mappings[node_id].GET_SCHEMA().category == "WaveFT"
    ours = [a for a in comfy.weight_adapter.adapters if getattr(a, "is_waveft_adapter", False)]
    assert len(ours) == 1 and issubclass(ours[0], comfy.weight_adapter.WeightAdapterBase)
    extension = asyncio.run(host["pack"].comfy_entrypoint())  # a second load must not register twice
    asyncio.run(extension.get_node_list())
    assert sum(getattr(a, "is_waveft_adapter", False) for a in comfy.weight_adapter.adapters) == 1
    paths, extensions = host["folder_paths"].folder_names_and_paths["waveft"]
    assert paths[-1] == str(host["work"] / "models" / "waveft") and ".safetensors" in extensions


def test_waveft_folder_keeps_extra_model_paths_entry(host):
    folder_paths = host["folder_paths"]
    saved = folder_paths.folder_names_and_paths.pop("waveft")
    try:
        folder_paths.add_model_folder_path("waveft", "/data/my_waveft")  # what extra_model_paths.yaml does first
        pack_module("nodes.paths").register_folder(folder_paths)
        paths, extensions = folder_paths.folder_names_and_paths["waveft"]
        assert paths == ["/data/my_waveft", str(host["work"] / "models" / "waveft")] and extensions
    finally:
        folder_paths.folder_names_and_paths["waveft"] = saved


def test_loader_node_patches_each_weight_exactly_and_unpatch_restores(host, base):
    layers = _layers(base)
    _save(host, "waveft", "exact.safetensors", _kohya(layers))
    before = {_key(n): _weight(base, _key(n)) for n in (Q4, K2, OUT)}
    loader = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"]
    assert "exact.safetensors" in loader.INPUT_TYPES()["required"]["adapter_name"][1]["options"]
    (patched,) = loader.execute(base, "exact.safetensors", 0.7).args
    assert patched is not base and not base.patches and set(patched.patches) == set(before)
    got = _loaded_weights(patched, before)
    for name, layer in layers.items():
        key, weight = _key(name), before[_key(name)]
        assert torch.equal(got[key], layer.add_to_(weight.clone(), 0.7)), key
        assert torch.allclose(got[key], weight + 0.7 * layer.delta_weight(), atol=1e-6), key
        assert not torch.equal(got[key], weight)
        assert torch.equal(_weight(base, key), weight), "unpatching must restore W"


def test_stock_lora_loaders_load_waveft_files(host, base):
    _save(host, "loras", "stock.safetensors", _kohya(_layers(base, seed=8)))
    mappings = host["nodes"].NODE_CLASS_MAPPINGS
    (via_stock,) = mappings["LoraLoaderModelOnly"]().load_lora_model_only(base, "stock.safetensors", -1.5)
    (via_ours,) = mappings["WaveFTLoaderModelOnly"].execute(base, "stock.safetensors", -1.5).args
    keys = [_key(n) for n in (Q4, K2, OUT)]
    stock, ours = _loaded_weights(via_stock, keys), _loaded_weights(via_ours, keys)
    for key in keys:
        assert torch.equal(stock[key], ours[key]), key
        assert not torch.equal(stock[key], _weight(base, key))


def test_clip_layers_and_strengths(host, base):
    clip = tiny_clip()
    layers = _kohya(_layers(base, seed=9))
    te = LayerAdapter(torch.randn(30), (16, 16), 25.0, "db1", seed=1)
    layers["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = te
    _save(host, "waveft", "with_te.safetensors", layers)
    loader = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoader"]
    model2, clip2 = loader.execute(base, clip, "with_te.safetensors", 0.0, 2.0).args
    assert model2 is base and clip2 is not clip and not clip.patcher.patches
    te_key = f"{TE}.weight"
    w0 = clip.cond_stage_model.state_dict()[te_key].clone()
    import comfy.model_management as mm

    mm.load_models_gpu([clip2.patcher])
    assert torch.equal(clip2.cond_stage_model.state_dict()[te_key], te.add_to_(w0.clone(), 2.0))
    mm.unload_all_models()
    assert torch.equal(clip.cond_stage_model.state_dict()[te_key], w0)
    assert loader.execute(base, clip, "with_te.safetensors", 0.0, 0.0).args == (base, clip)
    (model_only,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(base, "with_te.safetensors", 1.0).args
    assert all(k.startswith(UNET) for k in model_only.patches)


def test_low_vram_mode_gives_the_same_outputs(host, base):
    import comfy.model_management as mm

    _save(host, "waveft", "lowvram.safetensors", _kohya(_layers(base, seed=11)))
    (patched,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(base, "lowvram.safetensors", 1.3).args
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 8, 2048, generator=g), torch.randn(1, 1280, generator=g)
    y = patched.model.encode_adm(pooled_output=pooled, width=32, height=32)
    sigma = patched.model.model_sampling.percent_to_sigma(0.4) * torch.ones(1)
    mm.unload_all_models()
    with torch.inference_mode():
        plain = base.model.apply_model(x, sigma, c_crossattn=context, y=y)
        mm.load_models_gpu([patched])
        full = patched.model.apply_model(x, sigma, c_crossattn=context, y=y)
        mm.unload_all_models()
        patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
        assert patched.model.model_lowvram and patched.model.lowvram_patch_counter > 0
        assert torch.equal(_weight(patched, _key(Q4)), _weight(base, _key(Q4))), "low-VRAM must not bake weights"
        low = patched.model.apply_model(x, sigma, c_crossattn=context, y=y)
        patched.unpatch_model(device_to=torch.device("cpu"))
    assert not torch.allclose(full, plain, atol=1e-4)
    assert torch.allclose(low, full, atol=1e-5), (low - full).abs().max()


def test_bypass_h_is_strength_times_x_dw_t(host):
    adapter_class = pack_module("nodes.comfy_patching").setup()
    layer = LayerAdapter(torch.randn(60), (48, 40), 25.0, "db2", seed=4)
    adapter = adapter_class.from_layer(layer)
    adapter.multiplier = 0.6
    x = torch.randn(3, 5, 40)
    assert torch.allclose(adapter.h(x, None), 0.6 * x @ layer.delta_weight().T, atol=1e-5)
    out = adapter.bypass_forward(lambda t: t @ torch.eye(40, 48), x)
    assert torch.allclose(out, x @ torch.eye(40, 48) + 0.6 * x @ layer.delta_weight().T, atol=1e-5)


def _peft_folder(host, base, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = host["work"] / "models" / "waveft" / name
    folder.mkdir(parents=True)
    config = {"peft_type": "WAVEFT", "wavelet_family": "db2", "scaling": 12.0, "random_loc_seed": 21, "use_idwt": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    spectra = {}
    for ldm in (Q4, OUT):
        spectra[f"base_model.model.{unet_ldm_to_diffusers(ldm)}.waveft_spectrum"] = torch.randn(64)
    save_file(spectra, str(folder / "adapter_model.safetensors"))
    return spectra, config


def test_peft_adapter_with_diffusers_names_loads(host, base):
    spectra, config = _peft_folder(host, base, "peft_dog")
    (patched,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(
        base, "peft_dog/adapter_model.safetensors", 1.0).args
    got = _loaded_weights(patched, [_key(Q4), _key(OUT)])
    for ldm, coef in zip((Q4, OUT), spectra.values(), strict=True):
        w0 = _weight(base, _key(ldm))
        layer = LayerAdapter(coef, tuple(w0.shape), config["scaling"], config["wavelet_family"], seed=config["random_loc_seed"])
        assert torch.equal(got[_key(ldm)], layer.add_to_(w0.clone(), 1.0)), ldm


def test_diffusers_named_v1_file_loads_and_unmapped_layers_are_reported(host, base, caplog):
    layers = _layers(base, seed=12)
    renamed = {f"unet.{unet_ldm_to_diffusers(name)}": layer for name, layer in layers.items() if name != OUT}
    renamed["lora_unet_not_a_layer_at_all"] = LayerAdapter(torch.randn(4), (8, 8), 25.0, "db1", seed=1)
    _save(host, "waveft", "diffusers_named.safetensors", renamed)
    with caplog.at_level(logging.WARNING):
        (patched,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(
            base, "diffusers_named.safetensors", 1.0).args
    assert {_key(Q4), _key(K2)} == set(patched.patches)
    assert "1 layer(s) match no weight" in caplog.text and "lora_unet_not_a_layer_at_all" in caplog.text


def test_file_for_another_model_family_fails_clearly(host, base):
    wrong = {f"lora_unet_{Q4.replace('.', '_')}": LayerAdapter(torch.randn(10), (640, 640), 25.0, "db1", seed=1)}
    _save(host, "waveft", "sd15_like.safetensors", wrong)
    loader = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"]
    with pytest.raises(ValueError, match="another model family"):
        loader.execute(base, "sd15_like.safetensors", 1.0)
    nothing = {"lora_unet_input_blocks_1_1_proj_in": LayerAdapter(torch.randn(10), (320, 320), 25.0, "db1", seed=1)}
    _save(host, "waveft", "nothing_maps.safetensors", nothing)
    with pytest.raises(ValueError, match="none of its 1 layer"):
        loader.execute(base, "nothing_maps.safetensors", 1.0)


def test_bad_layer_in_stock_loader_names_the_key(host, base):
    import comfy.sd

    prefix = f"lora_unet_{Q4.replace('.', '_')}"
    tensors = LayerAdapter(torch.randn(10), (64, 64), 25.0, "db1", seed=1).tensors(prefix)
    tensors[f"{prefix}.waveft_coef"][3] = float("nan")
    with pytest.raises(ValueError, match=f"{prefix}.waveft_coef: contains NaN"):
        comfy.sd.load_lora_for_models(base, None, tensors, 1.0, 0.0)


def test_prompt_with_waveft_loader_runs_through_the_executor(host, base):
    _save(host, "waveft", "prompt.safetensors", _kohya(_layers(base, seed=13)))
    prompt = {
        "1": {"class_type": "WaveFTTestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "WaveFTLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "adapter_name": "prompt.safetensors",
                                                      "strength_model": 0.8, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of zjw dog"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                                                  "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "waveft_test"}},
    }
    executor, _ = run_prompt(prompt)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.history_result["outputs"]["8"]["images"][0]["filename"].startswith("waveft_test")
