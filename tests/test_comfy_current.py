"""WaveFT on the paths of today's ComfyUI (``COMFYUI_PATH``; each test skips where the host lacks the feature):
dynamic VRAM's ``LowVramPatch`` that rebuilds adapters into a staging buffer, patch maths in fp16/bf16, and
the bypass loader that calls ``h()`` on activations.
"""

from __future__ import annotations

import pytest
import torch
from comfy_host import K2, OUT, Q4, boot, require_comfy, tiny_sdxl, weight_key

from waveft_core import LayerAdapter
from waveft_core.names import kohya_name

require_comfy()

@pytest.fixture(scope="module")
def host():
    return boot()


@pytest.fixture(scope="module")
def base():
    return tiny_sdxl(seed=0)


def _file_tensors(model, seed: int = 5) -> tuple[dict[str, torch.Tensor], dict[str, LayerAdapter]]:
    """A file's tensors for three layers: seeded (db1, db2) and explicit positions (db3, a long filter)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    shape = {name: tuple(sd[weight_key(name)].shape) for name in (Q4, K2, OUT)}
    layers = {
        Q4: LayerAdapter(torch.randn(200, generator=g), shape[Q4], 25.0, "db1", seed=777),
        K2: LayerAdapter(torch.randn(150, generator=g), shape[K2], 10.0, "db2", seed=3),
        OUT: LayerAdapter(torch.randn(40, generator=g), shape[OUT], 25.0, "db3",
                          positions=torch.randperm(shape[OUT][0] * shape[OUT][1], generator=g)[:40]),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer.tensors(kohya_name("unet", name)))
    return tensors, layers


def _patched(base, strength: float = 0.7):
    import comfy.sd

    tensors, layers = _file_tensors(base)
    model, _ = comfy.sd.load_lora_for_models(base, None, tensors, strength, 0.0)
    return model, layers


def _has_dynamic_vram() -> bool:
    import comfy.model_patcher

    return hasattr(comfy.model_patcher.LowVramPatch, "prepare")


def _dynamic_patch(model, key: str):
    """``LowVramPatch`` driven the way ``comfy/ops.py`` drives it under dynamic VRAM: size it, prepare into a
    buffer whose bytes arrive later (filled with NaN until then), stage the data, then patch."""
    import comfy.model_patcher

    if not _has_dynamic_vram():
        pytest.skip("this ComfyUI has no dynamic VRAM (LowVramPatch.prepare)")
    patch = comfy.model_patcher.LowVramPatch(key, model.patches)
    size = patch.memory_required()
    assert size > 0, "the coefficients must be counted, so the host moves them"
    destination = torch.full((size,), 255, dtype=torch.uint8)  # 0xFFFFFFFF: NaN in float32
    patch.prepare(destination, None, copy=False, commit=True)
    pinned = torch.empty(size, dtype=torch.uint8)
    patch.prepare(pinned, None, copy=True, commit=False)
    destination.copy_(pinned)
    return patch


def test_dynamic_vram_patch_equals_a_full_load(host, base):
    import comfy.lora

    model, _ = _patched(base)
    sd = base.model.state_dict()
    for name in (Q4, K2, OUT):
        key = weight_key(name)
        full = comfy.lora.calculate_weight(model.patches[key], sd[key].clone(), key)
        dynamic = _dynamic_patch(model, key)(sd[key].clone())
        assert torch.equal(dynamic, full), name
        assert not torch.equal(full, sd[key]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_patch_maths_is_within_the_dtypes_rounding(host, base, dtype):
    """Dynamic VRAM and low-VRAM patch in the weight's own dtype (``intermediate_dtype=weight.dtype``)."""
    import comfy.lora

    model, layers = _patched(base, strength=0.7)
    sd = base.model.state_dict()
    eps = torch.finfo(dtype).eps
    for name, layer in layers.items():
        key = weight_key(name)
        w0 = sd[key].to(dtype)
        reference = w0.double() + 0.7 * layer.delta_weight().double()
        outputs = [comfy.lora.calculate_weight(model.patches[key], w0.clone(), key, intermediate_dtype=dtype)]
        if _has_dynamic_vram():
            outputs.append(_dynamic_patch(model, key)(w0.clone()))
        for out in outputs:
            assert out.dtype == dtype
            error = (out.double() - reference).abs()
            bound = eps * reference.abs() + torch.finfo(dtype).tiny
            assert bool((error <= bound).all()), (name, float((error / bound).max()))


def _forward(model):
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 8, 2048, generator=g), torch.randn(1, 1280, generator=g)
    y = model.model.encode_adm(pooled_output=pooled, width=32, height=32)
    sigma = model.model.model_sampling.percent_to_sigma(0.4) * torch.ones(1)
    with torch.inference_mode():
        mm.load_models_gpu([model])
        out = model.model.apply_model(x, sigma, c_crossattn=context, y=y)
        mm.unload_all_models()
    return out


def test_bypass_loader_equals_the_merged_model(host, base):
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no bypass LoRA loader")
    tensors, _ = _file_tensors(base, seed=6)
    merged, _ = comfy.sd.load_lora_for_models(base, None, tensors, 0.6, 0.0)
    bypass, _ = comfy.sd.load_bypass_lora_for_models(base, None, tensors, 0.6, 0.0)
    assert not bypass.patches, "WaveFT layers must go to bypass injection, not weight patches"
    plain, with_merged, with_bypass = _forward(base), _forward(merged), _forward(bypass)
    assert not torch.allclose(with_merged, plain, atol=1e-4)
    assert torch.allclose(with_bypass, with_merged, atol=1e-5), (with_bypass - with_merged).abs().max()
    assert torch.equal(_forward(base), plain), "the base model must come back untouched"


def test_bypass_node_runs_a_waveft_file(host, base):
    import importlib

    try:
        debug_nodes = importlib.import_module("comfy_extras.nodes_lora_debug")
    except ModuleNotFoundError:
        pytest.skip("this ComfyUI has no bypass LoRA nodes (comfy_extras/nodes_lora_debug.py)")
    from safetensors.torch import save_file

    tensors, _ = _file_tensors(base, seed=7)
    save_file(tensors, str(host["work"] / "models" / "loras" / "bypass_dog.safetensors"))
    node = debug_nodes.NODE_CLASS_MAPPINGS["LoraLoaderBypassModelOnly"]()
    (patched,) = getattr(node, node.FUNCTION)(base, "bypass_dog.safetensors", 0.9)
    import comfy.sd

    merged, _ = comfy.sd.load_lora_for_models(base, None, tensors, 0.9, 0.0)
    assert torch.allclose(_forward(patched), _forward(merged), atol=1e-5)


def _load_extra_nodes(host, filename: str) -> dict:
    """Register one of ComfyUI's ``comfy_extras`` node files (as ComfyUI's start-up does); skip if absent."""
    import asyncio
    import os

    from comfy_host import COMFYUI_PATH

    path = os.path.join(COMFYUI_PATH, "comfy_extras", filename)
    if not os.path.isfile(path):
        pytest.skip(f"this ComfyUI has no comfy_extras/{filename}")
    nodes = host["nodes"]
    if not asyncio.run(nodes.load_custom_node(path, module_parent="comfy_extras")):
        pytest.fail(f"ComfyUI could not load comfy_extras/{filename}")
    return nodes.NODE_CLASS_MAPPINGS


def _widget_defaults(node_class) -> dict:
    """Every required widget input at its default (a combo at its first option)."""
    out = {}
    for name, conf in node_class.INPUT_TYPES()["required"].items():
        options = conf[0] if isinstance(conf[0], list) else (conf[1].get("options") if conf[0] == "COMBO" else None)
        if options:
            out[name] = (conf[1] or {}).get("default", options[0]) if len(conf) > 1 else options[0]
        elif len(conf) > 1 and isinstance(conf[1], dict) and "default" in conf[1]:
            out[name] = conf[1]["default"]
    return out


def _core_training_prompt(registry, steps: int, learning_rate: float, existing: str = "[None]") -> tuple[dict, str]:
    train = {**_widget_defaults(registry["TrainLoraNode"]), "algorithm": "WaveFT", "steps": steps, "rank": 2,
             "learning_rate": learning_rate, "training_dtype": "fp32", "lora_dtype": "bf16",
             "gradient_checkpointing": False, "existing_lora": existing, "seed": 3}  # fmt: skip
    save_id = "SaveLoRA" if "SaveLoRA" in registry else "SaveLoRANode"
    outputs = list(registry["TrainLoraNode"].RETURN_TYPES)  # 0.3.6x also returns the MODEL first
    lora_out, steps_out = outputs.index("LORA_MODEL"), len(outputs) - 1 - outputs[::-1].index("INT")
    prompt = {
        "1": {"class_type": "WaveFTTestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of zjw dog"}},
        "4": {"class_type": "TrainLoraNode", "inputs": {**train, "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0]}},
        "5": {"class_type": save_id, "inputs": {"lora": ["4", lora_out], "prefix": "loras/waveft_core", "steps": ["4", steps_out]}},
    }
    return prompt, save_id


def _saved_core_file(host, steps: int):
    found = sorted((host["work"] / "output" / "loras").glob(f"waveft_core_{steps}_steps_*.safetensors"))
    assert found, "SaveLoRA wrote no file"
    return found[-1]


def test_core_train_lora_node_trains_waveft_and_the_file_loads_back(host, base):
    """WaveFT as an algorithm of ComfyUI's own Train LoRA node: it trains, SaveLoRA writes a file that the stock
    LoRA loader and the WaveFT loader apply identically, and ``existing_lora`` continues it."""
    import shutil

    import comfy.sd
    from comfy_host import run_prompt
    from safetensors.torch import load_file

    from waveft_core import SUFFIXES, layer_from_tensors

    registry = _load_extra_nodes(host, "nodes_train.py")
    pack = boot()["pack"]
    import importlib

    importlib.import_module(f"{pack.__name__}.nodes.comfy_patching").setup()
    options = registry["TrainLoraNode"].INPUT_TYPES()["required"]["algorithm"]
    assert "WaveFT" in (options[0] if isinstance(options[0], list) else options[1]["options"])

    prompt, _ = _core_training_prompt(registry, steps=3, learning_rate=1e-2)
    executor, _ = run_prompt(prompt)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    saved = load_file(str(_saved_core_file(host, 3)))
    prefixes = sorted({k.rpartition(".")[0] for k in saved if k.endswith(".waveft_coef")})
    conv = "diffusion_model.input_blocks.1.0.in_layers.2"
    assert f"diffusion_model.{Q4}" in prefixes and conv in prefixes  # Linears and convolutions
    assert saved[f"diffusion_model.{Q4}.waveft_coef"].dtype == torch.bfloat16  # the trainer's LoRA dtype
    layers = {p: layer_from_tensors(p, {s: saved[f"{p}.{s}"] for s in SUFFIXES if f"{p}.{s}" in saved}) for p in prefixes}
    assert sum(bool(layer.coef.abs().sum() > 0) for layer in layers.values()) > len(layers) // 2, "it must train"
    assert layers[conv].shape == (base.model.state_dict()[f"{conv}.weight"].shape[0], base.model.state_dict()[f"{conv}.weight"][0].numel())

    stock, _ = comfy.sd.load_lora_for_models(base, None, saved, 1.0, 0.0)
    # the loaders list it once moved into models/loras; the trainer reads the step count from its name
    path = host["work"] / "models" / "loras" / _saved_core_file(host, 3).name
    shutil.copy(_saved_core_file(host, 3), path)
    (ours,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(base, path.name, 1.0).args
    keys = [f"diffusion_model.{Q4}.weight", f"{conv}.weight"]
    stock_w, ours_w = _patched_weights(stock, keys), _patched_weights(ours, keys)
    sd = base.model.state_dict()
    for key in keys:
        assert torch.equal(stock_w[key], ours_w[key]), key
        layer = layers[key[: -len(".weight")]]
        expected = sd[key].clone()
        layer.add_to_(expected.view(layer.shape), 1.0)
        assert torch.equal(stock_w[key], expected), key

    resumed, _ = _core_training_prompt(registry, steps=2, learning_rate=1e-7, existing=path.name)
    executor, _ = run_prompt(resumed)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    continued = load_file(str(_saved_core_file(host, 5)))  # 3 earlier + 2 new steps
    for prefix in prefixes:  # at a learning rate of 1e-7 the run continues where the file left off
        before, after = saved[f"{prefix}.waveft_coef"].float(), continued[f"{prefix}.waveft_coef"].float()
        assert torch.allclose(after, before, atol=1e-5), prefix
    assert sum(bool(saved[f"{p}.waveft_coef"].abs().max() > 1e-4) for p in prefixes) > len(prefixes) // 2


def _patched_weights(model, keys) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu([model])
        weights = {key: model.model.state_dict()[key].detach().clone() for key in keys}
        mm.unload_all_models()
    return weights


def test_hook_lora_with_keyframes_patches_each_step_at_the_keyframes_strength(host, base):
    """ComfyUI's hooks (CreateHookLora + keyframes) load WaveFT layers through ``load_lora`` and re-patch the
    weights per step: every step's weight must be ``W0 + s dW`` with ``s`` the keyframe's strength."""
    import comfy.hooks
    import comfy.sample

    if not hasattr(comfy.hooks, "create_hook_lora"):
        pytest.skip("this ComfyUI has no hooks")
    tensors, layers = _file_tensors(base, seed=8)
    hooks = comfy.hooks.create_hook_lora(tensors, strength_model=1.0, strength_clip=0.0)
    keyframes = comfy.hooks.HookKeyframeGroup()
    keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.0))
    keyframes.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.5))
    hooks.set_keyframes_on_hooks(keyframes)

    model = base.clone()
    key = weight_key(Q4)
    seen: list[torch.Tensor] = []

    def record(apply_model, args):
        seen.append(model.model.state_dict()[key].detach().clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    g = torch.Generator().manual_seed(0)
    positive = comfy.hooks.set_hooks_for_conditioning(
        [[torch.randn(1, 8, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]], hooks)
    negative = [[torch.zeros(1, 8, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    latent = torch.zeros(1, 4, 4, 4)
    comfy.sample.sample(model, torch.randn(1, 4, 4, 4, generator=g), 6, 1.0, "euler", "normal", positive, negative,
                        latent, disable_pbar=True, seed=1)
    w0, delta = base.model.state_dict()[key], layers[Q4].delta_weight()
    strengths = []
    for weight in seen:
        s = float(((weight - w0) * delta).sum() / (delta * delta).sum())
        assert torch.allclose(weight, w0 + s * delta, atol=1e-5)
        strengths.append(round(s, 4))
    assert strengths == sorted(strengths) and set(strengths) == {0.0, 1.0}, strengths


def test_lora_save_extracts_a_plain_lora_from_a_waveft_model(host, base, capsys):
    """ComfyUI's Extract and Save Lora on ``ModelMergeSubtract(WaveFT model, base)``: it receives exactly the
    WaveFT update (its full-diff output equals ``dW``), and a plain LoRA comes out whose error against that
    update is printed. (ComfyUI's extraction clamps the singular vectors' entries at their 99th percentile,
    which loses much of a sparse, high-rank WaveFT update even at full rank: the figures say how much.)"""
    import comfy.sd
    from comfy_host import run_prompt
    from safetensors.torch import load_file, save_file

    assert "LoraSave" in _load_extra_nodes(host, "nodes_lora_extract.py")
    _load_extra_nodes(host, "nodes_model_merging.py")
    tensors, layers = _file_tensors(base, seed=9)
    save_file(tensors, str(host["work"] / "models" / "loras" / "extract_me.safetensors"))

    def extract(kind: str, rank: int) -> dict[str, torch.Tensor]:
        prefix = f"loras/extracted_{kind}_r{rank}"
        prompt = {
            "1": {"class_type": "WaveFTTestTinyModels", "inputs": {"seed": 0}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "extract_me.safetensors", "strength_model": 1.0}},
            "3": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["2", 0], "model2": ["1", 0], "multiplier": 1.0}},
            "4": {"class_type": "LoraSave", "inputs": {"filename_prefix": prefix, "rank": rank, "lora_type": kind,
                                                       "bias_diff": False, "model_diff": ["3", 0]}},
        }
        executor, _ = run_prompt(prompt)
        assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
        (path,) = (host["work"] / "output").glob(f"{prefix}_*.safetensors")
        return load_file(str(path))

    full = extract("full_diff", 1)
    for name, layer in layers.items():
        torch.testing.assert_close(full[f"diffusion_model.{name}.diff"].float(), layer.delta_weight(), rtol=1e-3, atol=1e-3)
    errors = {}
    for rank in (4, 64):
        extracted = extract("standard", rank)
        assert f"diffusion_model.{Q4}.lora_up.weight" in extracted and not any(".waveft_" in k for k in extracted)
        as_lora, _ = comfy.sd.load_lora_for_models(base, None, extracted, 1.0, 0.0)
        weights = _patched_weights(as_lora, [weight_key(name) for name in layers])
        for name, layer in layers.items():
            delta = layer.delta_weight()
            got = weights[weight_key(name)] - base.model.state_dict()[weight_key(name)]
            errors[f"r{rank} {name.split('.')[0]} {tuple(delta.shape)}"] = round(float((got - delta).norm() / delta.norm()), 3)
    with capsys.disabled():
        print("\nLoraSave of a WaveFT model, relative error of the extracted LoRA's update:", errors)
    assert all(error <= 1.01 for error in errors.values()), errors


def test_unloading_a_waveft_model_releases_the_shared_caches(host, base):
    """WaveFT's shared plans and patch indices must not outlive the model ComfyUI unloads (device memory)."""
    import comfy.model_management as mm
    from comfy_host import pack_module
    from safetensors.torch import save_file

    cache = pack_module("waveft_core.plans").seeded_patch_index
    tensors, _ = _file_tensors(base, seed=10)
    save_file(tensors, str(host["work"] / "models" / "loras" / "unload_me.safetensors"))
    (patched,) = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTLoaderModelOnly"].execute(base, "unload_me.safetensors", 1.0).args
    with torch.inference_mode():
        mm.load_models_gpu([patched])
        assert cache.cache_info().currsize > 0
        mm.unload_all_models()
    assert cache.cache_info().currsize == 0
