"""The ComfyUI glue that needs no ComfyUI: the weight adapter on a stand-in base class, key mapping and the
unmapped-layer report, PEFT files, model folders and safe names, image buckets. Runs on plain CI.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from packs import load_pack
from safetensors.torch import save_file

from waveft_core import LayerAdapter


def _core(name: str):
    return importlib.import_module(f"{load_pack().__name__}.waveft_core.{name}")


def _glue(name: str):
    return importlib.import_module(f"{load_pack().__name__}.nodes.{name}")


class FakeBase:
    """Stands in for ``comfy.weight_adapter.WeightAdapterBase`` (whose methods raise NotImplementedError)."""

    @classmethod
    def load(cls, *args):
        raise NotImplementedError


@pytest.fixture
def adapter_class():
    return _core("comfy_protocol").make_adapter_class(FakeBase)


def _layer(shape=(24, 20), p=30, wavelet="db1", seed=4, scaling=25.0) -> LayerAdapter:
    return LayerAdapter(torch.randn(p, generator=torch.Generator().manual_seed(seed)), shape, scaling, wavelet, seed=seed)


def test_nodes_package_imports_without_comfyui():
    nodes = importlib.import_module(f"{load_pack().__name__}.nodes")
    assert inspect.iscoroutinefunction(nodes.comfy_entrypoint)
    assert not hasattr(load_pack(), "NODE_CLASS_MAPPINGS"), "it would hide comfy_entrypoint from ComfyUI"


def test_adapter_load_claims_keys_and_ignores_other_layers(adapter_class):
    layer = _layer()
    lora = {**layer.tensors("lora_unet_x"), "lora_unet_y.lora_up.weight": torch.zeros(1), "lora_unet_x.alpha": torch.tensor(1.0)}
    loaded: set[str] = set()
    assert adapter_class.load("lora_unet_y", lora, None, None, loaded) is None and not loaded
    adapter = adapter_class.load("lora_unet_x", lora, None, None, loaded)
    assert isinstance(adapter, FakeBase) and adapter.name == "waveft"
    assert loaded == {f"lora_unet_x.{s}" for s in ("waveft_coef", "waveft_shape", "waveft_scale", "waveft_wavelet", "waveft_seed")}
    assert adapter.loaded_keys is loaded and adapter.shape == (24, 20)
    assert adapter_class.load("lora_unet_x", lora, None, None) is not None  # hosts that pass 4 arguments


def test_adapter_load_rejects_a_bad_layer_naming_the_key(adapter_class):
    lora = _layer().tensors("lora_unet_x")
    lora["lora_unet_x.waveft_shape"] = torch.tensor([24, -20])
    with pytest.raises(ValueError, match=r"lora_unet_x\.waveft_shape"):
        adapter_class.load("lora_unet_x", lora, None, None, set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_calculate_weight_adds_strength_times_dw_in_place(adapter_class, dtype):
    layer = _layer(wavelet="db2")
    adapter = adapter_class.from_layer(layer)
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta = 0.4 * layer.delta_weight()
    expected = (weight.float() + delta).to(dtype)
    out = adapter.calculate_weight(weight, "k", 0.4, 1.0, None, lambda a: a)
    assert out is weight
    # the taps are summed in another order than delta_weight sums them: float32 rounding of the terms' size
    # (a result near zero after cancellation is no smaller in absolute error); half precision: one rounding
    scale = float(weight.float().abs().max() + delta.abs().max())
    atol = 1e-2 if dtype != torch.float32 else 1e-6 * scale
    assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=1e-5)


def test_calculate_weight_on_a_narrowed_view_and_with_a_function(adapter_class):
    layer = _layer()
    adapter = adapter_class.from_layer(layer)
    fused = torch.zeros(72, 20)
    view = fused.narrow(0, 24, 24)  # what ComfyUI passes with an offset; it keeps the original tensor
    adapter.calculate_weight(view, "k", 1.0, 1.0, (0, 24, 24), lambda a: a)
    assert torch.allclose(fused[24:48], layer.delta_weight(), atol=1e-6) and not fused[:24].any() and not fused[48:].any()
    weight = torch.zeros(24, 20)
    adapter.calculate_weight(weight, "k", 2.0, 1.0, None, lambda a: a * 3)
    assert torch.allclose(weight, 6 * layer.delta_weight(), atol=1e-5)


def test_calculate_weight_refuses_a_wrong_shape(adapter_class, caplog):
    weight = torch.zeros(20, 24)
    with caplog.at_level(logging.ERROR):
        assert adapter_class.from_layer(_layer()).calculate_weight(weight, "diffusion_model.x.weight", 1.0, 1.0, None, None) is weight
    assert not weight.any() and "diffusion_model.x.weight" in caplog.text


def test_h_is_strength_times_x_dw_t(adapter_class):
    layer = _layer(wavelet="sym3")
    adapter = adapter_class.from_layer(layer)
    adapter.multiplier = -0.7
    x = torch.randn(2, 7, 20)
    assert torch.allclose(adapter.h(x, None), -0.7 * x @ layer.delta_weight().T, atol=1e-5)


def test_adapter_is_rebuilt_from_loaded_keys_and_weights_alone(adapter_class):
    """Newer ComfyUI (dynamic VRAM) rebuilds ``type(v)(v.loaded_keys, moved(v.weights))`` with the tensor data
    arriving after construction; explicit positions ride along untouched."""
    layer = _layer(wavelet="db2")
    explicit = LayerAdapter(layer.coef, layer.shape, layer.scaling, layer.wavelet, positions=layer.flat_positions())
    for source in (layer, explicit):
        adapter = adapter_class.from_layer(source)
        staged = torch.full_like(adapter.weights[0], float("nan"))
        rebuilt = type(adapter)(adapter.loaded_keys, [staged, adapter.weights[1]])
        staged.copy_(adapter.weights[0])  # the data lands only now
        weight = torch.randn(24, 20)
        expected = adapter.calculate_weight(weight.clone(), "k", 0.8, 1.0, None, None)
        assert torch.equal(rebuilt.calculate_weight(weight, "k", 0.8, 1.0, None, None), expected)
        assert rebuilt.calculate_shape("k") is None and rebuilt.loaded_keys is adapter.loaded_keys  # shape unchanged


def test_adapter_survives_bypass_casting_its_tensors(adapter_class):
    """The bypass loader replaces ``weights`` with every tensor cast to the layer's dtype, integers included;
    only the coefficients are a tensor there, and the maths stays in float32."""
    layer = _layer(shape=(640, 64), p=200, wavelet="db1")
    explicit = LayerAdapter(layer.coef, layer.shape, layer.scaling, layer.wavelet, positions=layer.flat_positions())
    adapter = adapter_class.from_layer(explicit)
    adapter.weights = [w.to(torch.bfloat16) if isinstance(w, torch.Tensor) else w for w in adapter.weights]
    x = torch.randn(3, 64)
    reference = x.double() @ layer.with_coef(layer.coef.to(torch.bfloat16).double()).delta_weight().double().T
    assert torch.allclose(adapter.h(x, None).double(), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(adapter.weights[1].positions, layer.flat_positions())


def test_adapter_refuses_weights_it_cannot_use(adapter_class):
    with pytest.raises(TypeError, match="coef, LayerAdapter"):
        adapter_class(set(), [torch.zeros(3)])


def test_register_is_idempotent():
    weight_adapter = _core("comfy_protocol")
    adapters: list[type] = [FakeBase]
    first = weight_adapter.register(adapters, FakeBase)
    second = weight_adapter.register(adapters, FakeBase)
    assert adapters == [FakeBase, second] and first is not second


def test_diffusers_and_peft_spellings_map_to_ldm_keys():
    patches = _glue("patches")
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight"
    aliases = patches.diffusers_aliases([key, "diffusion_model.time_embed.0.bias", "model_sampling.sigmas"])
    diffusers = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    for alias in (diffusers, f"unet.{diffusers}", f"base_model.model.{diffusers}", "lora_unet_" + diffusers.replace(".", "_")):
        assert aliases[alias] == key
    assert len(aliases) == 4
    assert patches.unet_key_map({"x": "comfy"}, [key])["x"] == "comfy"


def test_plan_reports_unmapped_and_skips_text_encoder_layers(caplog):
    patches = _glue("patches")
    layers = {"lora_unet_a": _layer((4, 4), 3), "lora_te1_b": _layer((2, 2), 1), "lora_unet_zzz": _layer((4, 4), 2)}
    unet_map, shapes = {"lora_unet_a": "diffusion_model.a.weight"}, {"diffusion_model.a.weight": (4, 4)}
    plan = patches.plan_patches(layers, unet_map, shapes, None, None, "f.safetensors")
    assert list(plan.unet) == ["diffusion_model.a.weight"] and plan.unmapped == ["lora_unet_zzz"] and plan.skipped == ["lora_te1_b"]
    with caplog.at_level(logging.WARNING):
        plan.log_report("f.safetensors")
    assert "1 layer(s) match no weight" in caplog.text and "lora_unet_zzz" in caplog.text
    with_clip = patches.plan_patches(layers, unet_map, shapes, {"lora_te1_b": ("clip_l.w", (0, 2, 2))}, {"clip_l.w": (6, 2)})
    assert with_clip.clip == {("clip_l.w", (0, 2, 2)): layers["lora_te1_b"]} and not with_clip.skipped


def test_plan_refuses_files_of_another_model_family():
    patches = _glue("patches")
    unet_map, shapes = {"lora_unet_a": "diffusion_model.a.weight"}, {"diffusion_model.a.weight": (8, 4)}
    with pytest.raises(ValueError, match=r"lora_unet_a \(file \(4, 4\), model \(8, 4\)\).*another model family"):
        patches.plan_patches({"lora_unet_a": _layer((4, 4), 3)}, unet_map, shapes)
    with pytest.raises(ValueError, match="none of its 1 layer"):
        patches.plan_patches({"lora_unet_b": _layer((4, 4), 3)}, unet_map, shapes)


def _peft(tmp_path, spectra, config=None):
    save_file(spectra, str(tmp_path / "adapter_model.safetensors"))
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path / "adapter_model.safetensors"


def test_peft_file_reads_against_model_shapes(tmp_path):
    files = _glue("adapter_files")
    coef = torch.randn(40)
    config = {"peft_type": "WAVEFT", "wavelet_family": "db3", "scaling": 5.0, "random_loc_seed": 9}
    path = _peft(tmp_path, {"base_model.model.a.to_q.waveft_spectrum": coef, "base_model.model.gone.waveft_spectrum": coef.clone()}, config)
    layers, meta, unknown = files.read_adapter(path, {"base_model.model.a.to_q": (16, 12)}.get)
    layer = layers["base_model.model.a.to_q"]
    assert (layer.shape, layer.wavelet, layer.scaling, layer.seed) == ((16, 12), "db3", 5.0, 9)
    assert torch.equal(layer.coef, coef) and unknown == ["base_model.model.gone"] and meta["waveft_converted_from"] == "peft"


def test_peft_defaults_and_bad_inputs(tmp_path, caplog):
    files = _glue("adapter_files")
    key = "base_model.model.a.waveft_spectrum"
    with caplog.at_level(logging.WARNING):
        layers, _, _ = files.read_adapter(_peft(tmp_path, {key: torch.randn(5)}), {"base_model.model.a": (4, 4)}.get)
    assert layers["base_model.model.a"].seed == 777 and "no adapter_config.json" in caplog.text
    with pytest.raises(ValueError, match="20 coefficients|\\[20\\] coefficients"):
        files.read_adapter(_peft(tmp_path, {key: torch.randn(20)}), {"base_model.model.a": (4, 4)}.get)
    with pytest.raises(ValueError, match="waveft_coef"):
        files.read_adapter(_peft(tmp_path, {key: torch.arange(5)}), {"base_model.model.a": (4, 4)}.get)
    with pytest.raises(ValueError, match="peft_type is 'LORA', not WAVEFT"):
        files.read_adapter(_peft(tmp_path, {key: torch.randn(5)}, {"peft_type": "LORA"}), {"base_model.model.a": (4, 4)}.get)
    with pytest.raises(ValueError, match="none of its 1 PEFT layer"):
        files.read_adapter(_peft(tmp_path, {key: torch.randn(5)}, {}), {}.get)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        files.read_adapter(tmp_path / "junk.safetensors", {}.get)


def _fake_folder_paths(tmp_path, existing=None):
    table = {"loras": ([str(tmp_path / "loras")], {".safetensors", ".ckpt"})}
    if existing is not None:
        table["waveft"] = (list(existing), set())

    def get_filename_list(name):
        folders, extensions = table[name]
        found = [p.relative_to(f).as_posix() for f in map(type(tmp_path), folders) if f.is_dir() for p in f.rglob("*") if p.is_file()]
        return sorted(n for n in found if not extensions or any(n.endswith(e) for e in extensions))

    def get_full_path(name, filename):
        for folder in table[name][0]:
            candidate = type(tmp_path)(folder) / filename
            if candidate.is_file():
                return str(candidate)
        return None

    return SimpleNamespace(models_dir=str(tmp_path), folder_names_and_paths=table, filename_list_cache={"waveft": 1},
                           get_filename_list=get_filename_list, get_full_path=get_full_path,
                           get_folder_paths=lambda name: list(table[name][0]))


def test_model_folder_listing_and_lookup(tmp_path):
    paths = _glue("paths")
    fp = _fake_folder_paths(tmp_path, existing=[str(tmp_path / "yaml_waveft")])
    assert paths.register_folder(fp) == [str(tmp_path / "yaml_waveft"), str(tmp_path / "waveft")]
    assert paths.register_folder(fp) == [str(tmp_path / "yaml_waveft"), str(tmp_path / "waveft")]
    assert fp.folder_names_and_paths["waveft"][1] == {".safetensors", ".sft"} and "waveft" not in fp.filename_list_cache
    assert paths.adapter_files(fp) == []
    for rel in ("waveft/a.safetensors", "waveft/checkpoints/run-1.safetensors", "waveft/sub/b.safetensors",
                "loras/a.safetensors", "loras/c.safetensors", "loras/d.ckpt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    # training checkpoints come last, so a new loader node never picks one by default
    assert paths.adapter_files(fp) == ["a.safetensors", "sub/b.safetensors", "c.safetensors", "checkpoints/run-1.safetensors"]
    with pytest.raises(FileNotFoundError, match="No WaveFT adapter selected"):
        paths.resolve(fp, paths.NO_ADAPTERS)
    assert paths.resolve(fp, "a.safetensors") == str(tmp_path / "waveft" / "a.safetensors")
    assert paths.resolve(fp, "c.safetensors") == str(tmp_path / "loras" / "c.safetensors")
    with pytest.raises(FileNotFoundError):
        paths.resolve(fp, "missing.safetensors")


@pytest.mark.parametrize(("name", "stem"), [
    ("dog", "dog"), ("../../etc/passwd", "etc/passwd"), ("a/../b", "a/b"), ("/abs/x.safetensors", "abs/x"),
    ("we ird*na:me?", "we ird_na_me_"), ("..", "waveft"), ("", "waveft"), ("C:\\\\x\\\\y", "C_/x/y"),
])  # fmt: skip
def test_safe_stem(name, stem):
    assert _glue("paths").safe_stem(name) == stem


def test_saves_never_overwrite_and_leave_no_placeholder(tmp_path):
    from waveft_core import save_adapter_new

    paths = _glue("paths")
    fp = _fake_folder_paths(tmp_path)
    paths.register_folder(fp)
    layers = {"lora_unet_x": _layer()}
    first = save_adapter_new(paths.save_candidates(fp, "waveft", "subjects/dog"), layers)
    second = save_adapter_new(paths.save_candidates(fp, "waveft", "subjects/dog.safetensors"), layers)
    third = save_adapter_new(paths.save_candidates(fp, "loras", "../../../dog"), layers)
    assert first == tmp_path / "waveft" / "subjects" / "dog.safetensors" and first.stat().st_size > 0
    assert second == tmp_path / "waveft" / "subjects" / "dog_001.safetensors"
    assert third == tmp_path / "loras" / "dog.safetensors"
    assert not [p for p in (tmp_path / "waveft" / "subjects").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError):
        next(paths.save_candidates(fp, "checkpoints", "dog"))


def test_a_killed_save_leaves_no_real_name_and_its_temporary_is_swept(tmp_path, monkeypatch):
    """A process killed while saving: no file appears under a real name, and the hidden temporary it left is
    removed by a later save into that folder once it is an hour old."""
    import os
    import time

    import waveft_core.adapter_file as adapter_file

    paths = _glue("paths")
    fp = _fake_folder_paths(tmp_path)
    paths.register_folder(fp)

    def killed(*args):
        raise KeyboardInterrupt  # stands for SIGKILL between writing and naming

    monkeypatch.setattr(adapter_file.os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        adapter_file.save_adapter_new(paths.save_candidates(fp, "loras", "dog"), {"lora_unet_x": _layer()})
    assert not list((tmp_path / "loras").glob("*.safetensors"))
    monkeypatch.undo()
    litter = tmp_path / "loras" / ".cat.safetensors.abcd1234.tmp"  # what SIGKILL itself would leave
    litter.write_bytes(b"x" * 100)
    os.utime(litter, (time.time() - 7200, time.time() - 7200))
    someone_elses = tmp_path / "loras" / ".other.tmp"
    someone_elses.write_bytes(b"y")
    os.utime(someone_elses, (time.time() - 7200, time.time() - 7200))
    adapter_file.save_adapter_new(paths.save_candidates(fp, "loras", "dog"), {"lora_unet_x": _layer()})
    assert not litter.exists() and someone_elses.exists()


def test_long_names_are_cut_to_fit_file_systems():
    paths = _glue("paths")
    stem = paths.safe_stem("a" * 300 + "/" + "b" * 300)
    assert stem == "a" * 100 + "/" + "b" * 100


def test_buckets_keep_aspect_and_resolution():
    images = _glue("images")
    assert images.bucket_for(1024, 1024, 1024) == (1024, 1024)
    assert images.bucket_for(768, 1344, 1024) == (768, 1344)
    assert images.bucket_for(40, 40, 32) == (32, 32) and images.bucket_for(24, 56, 32) == (24, 48)
    fitted = images.fit_to_bucket(torch.rand(30, 90, 3), (24, 48))
    assert fitted.shape == (24, 48, 3) and 0 <= float(fitted.min()) and float(fitted.max()) <= 1
    grouped = images.bucket_images([torch.rand(2, 40, 40, 4), torch.rand(1, 24, 56, 3), torch.rand(64, 64, 3)], 32)
    assert {size: batch.shape[0] for size, batch in grouped.items()} == {(24, 48): 1, (32, 32): 3}
    with pytest.raises(ValueError):
        images.bucket_images([], 32)


UNET_Q = "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
TE1_Q = "te1.transformer.text_model.encoder.layers.0.self_attn.q_proj"
TE2_FC = "te2.transformer.text_model.encoder.layers.31.mlp.fc1"


@pytest.mark.parametrize(
    "unet_pattern,te_pattern,matched",
    [
        (r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$", "", {UNET_Q}),  # the default: UNet only
        (r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$", r"self_attn\.(q_proj|v_proj)$", {UNET_Q, TE1_Q}),
        (r"^input_blocks\.4\.", r"fc1$", {UNET_Q, TE2_FC}),  # ^ anchors inside the part
        (r"^transformer_blocks", r"^text_model", {TE1_Q, TE2_FC}),
        (r"attn2", r"q_proj|fc1", {TE1_Q, TE2_FC}),  # top-level alternation stays inside its part
    ],
)
def test_part_pattern_selects_within_each_part(unet_pattern, te_pattern, matched):
    import re

    pattern = re.compile(_glue("patches").part_pattern(unet_pattern, te_pattern))
    assert {name for name in (UNET_Q, TE1_Q, TE2_FC) if pattern.search(name)} == matched


def test_part_prefix_is_the_kohya_name():
    part_prefix = _glue("patches").part_prefix
    assert part_prefix(UNET_Q) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert part_prefix(TE1_Q) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert part_prefix(TE2_FC) == "lora_te2_text_model_encoder_layers_31_mlp_fc1"


def test_text_encoders_are_named_as_kohya_does():
    """SDXL's two encoders are ``te1``/``te2`` (``lora_te1_``/``lora_te2_``); SD1's lone CLIP-L is ``te``
    (``lora_te_``, what kohya and A1111 expect there)."""
    patches = _glue("patches")
    clip_l, clip_g = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    sdxl = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=clip_l, clip_g=clip_g))
    sd1 = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=clip_l))
    assert patches.text_encoders(sdxl) == {"te1": clip_l, "te2": clip_g}
    assert patches.text_encoders(sd1) == {"te": clip_l}
    name = "te.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert patches.part_prefix(name) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    import re

    assert re.search(patches.part_pattern("attn1", r"q_proj$"), name)


class FakeTrainBase(torch.nn.Module):
    """Stands in for ``comfy.weight_adapter.WeightAdapterTrainBase`` (an ``nn.Module`` with bypass attributes)."""

    multiplier = 1.0


@pytest.fixture
def train_class():
    return _core("comfy_protocol").make_adapter_class(FakeBase, FakeTrainBase)


def test_core_trainer_layer_starts_as_a_no_op_with_loras_parameter_count(train_class):
    weight = torch.randn(48, 40)
    module = train_class.create_train(weight, rank=3, alpha=7.0)
    assert isinstance(module, FakeTrainBase) and module.waveft_coef.numel() == 3 * (48 + 40)
    assert torch.equal(module(weight), weight)
    names = {name for name, _ in module.named_parameters()}
    assert names == {"waveft_coef", "waveft_shape", "waveft_scale", "waveft_wavelet", "waveft_seed"}
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["waveft_coef"]


def test_core_trainer_layer_gradients_and_bypass_agree_with_the_layer(train_class):
    weight = torch.randn(48, 40)
    module = train_class.create_train(weight, rank=2)
    with torch.no_grad():
        module.waveft_coef.normal_()
    layer = module.spec.with_coef(module.waveft_coef.detach())
    assert torch.allclose(module(weight), weight + layer.delta_weight(), atol=1e-5)
    x, g = torch.randn(5, 40), torch.randn(5, 48)
    (torch.nn.functional.linear(x, module(weight)) * g).sum().backward()
    weight_mode = module.waveft_coef.grad.clone()
    module.waveft_coef.grad = None
    module.multiplier = 1.0
    (module.h(x, None) * g).sum().backward()
    assert torch.allclose(module.waveft_coef.grad, weight_mode, rtol=1e-4, atol=1e-4)
    assert torch.allclose(module.h(x, None), x @ layer.delta_weight().T, atol=1e-4)


def test_core_trainer_layer_on_a_convolution(train_class):
    conv = torch.nn.Conv2d(6, 8, 3, padding=1)
    module = train_class.create_train(conv.weight, rank=1)
    with torch.no_grad():
        module.waveft_coef.normal_()
    assert module.spec.shape == (8, 54)
    patched = module(conv.weight)
    delta = module.spec.with_coef(module.waveft_coef.detach()).delta_weight()
    assert patched.shape == conv.weight.shape and torch.allclose(patched, conv.weight + delta.view(8, 6, 3, 3), atol=1e-5)
    module.is_conv, module.conv_dim, module.out_channels, module.in_channels = True, 2, 8, 6
    module.kernel_size, module.kw_dict, module.multiplier = (3, 3), {"padding": (1, 1)}, 0.5
    x = torch.randn(2, 6, 5, 5)
    expected = torch.nn.functional.conv2d(x, 0.5 * delta.view(8, 6, 3, 3), padding=1)
    assert torch.allclose(module.h(x, None), expected, atol=1e-5)


def test_core_trainer_file_round_trip_through_bf16(train_class):
    """The trainer saves every parameter in its LoRA dtype: the stock loader must read the layer back."""
    module = train_class.create_train(torch.randn(64, 32), rank=1)
    with torch.no_grad():
        module.waveft_coef.normal_()
    saved = {f"lora_unet_x.{name}": p.detach().to(torch.bfloat16) for name, p in module.named_parameters()}
    adapter = train_class.load("lora_unet_x", saved, None, None)
    assert adapter is not None and adapter.layer.shape == (64, 32) and adapter.layer.seed == module.spec.seed
    expected = module.spec.with_coef(module.waveft_coef.detach().to(torch.bfloat16).float()).delta_weight()
    assert torch.allclose(adapter.layer.delta_weight(), expected, atol=1e-6)
    resumed = adapter.to_train()
    assert isinstance(resumed, FakeTrainBase) and torch.equal(resumed.waveft_coef, adapter.layer.coef)


def test_float_stored_integers_that_are_not_exact_are_refused():
    tensors = {k.rpartition(".")[2]: v for k, v in _layer().tensors("x").items()}
    tensors["waveft_shape"] = torch.tensor([24.5, 20.0])
    with pytest.raises(ValueError, match=r"x\.waveft_shape: stored as torch.float32 but not exact integers"):
        importlib.import_module(f"{load_pack().__name__}.waveft_core").layer_from_tensors("x", tensors)


def test_register_offers_waveft_to_the_core_trainer(train_class):
    weight_adapter = _core("comfy_protocol")
    adapters: list[type] = []
    algorithms = {"LoRA": FakeBase}
    registered = weight_adapter.register(adapters, FakeBase, FakeTrainBase, algorithms)
    assert list(algorithms) == ["LoRA", "WaveFT"] and algorithms["WaveFT"] is registered
    assert weight_adapter.register(adapters, FakeBase, None, {}) is adapters[0] and len(adapters) == 1


@pytest.mark.parametrize("other", [".lora_up.weight", ".hada_w1_a", ".diff", ".lora_A.weight"])
def test_a_layer_mixing_waveft_and_another_adapter_is_refused(adapter_class, other):
    """ComfyUI applies one adapter class per layer (the last that matches): a mixed layer would lose a part."""
    lora = {**_layer().tensors("lora_unet_x"), f"lora_unet_x{other}": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"lora_unet_x: holds WaveFT and other adapter tensors"):
        adapter_class.load("lora_unet_x", lora, None, None)


def test_log_lines_escape_control_characters_in_names(caplog):
    plan = _glue("patches").PatchPlan()
    plan.unmapped.append("lora_unet_x\n[ComfyUI] fake line\x1b[31m")
    with caplog.at_level(logging.WARNING):
        plan.log_report("file\rname")
    assert "\n" not in caplog.text.strip() and "\x1b" not in caplog.text and "\\n[ComfyUI] fake line\\x1b[31m" in caplog.text
