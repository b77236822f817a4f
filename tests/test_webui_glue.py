"""A1111/Forge glue that needs no host: detection, key helpers, prompt tags, X/Y/Z, install.py, the shim.

Fake host modules are put in ``sys.modules`` with ``monkeypatch`` (undone after each test), so nothing leaks.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from packs import ROOT, load_pack

from waveft_core import LayerAdapter

PACK = "waveft_pack_glue_test"
pack = load_pack(PACK)
webui_ext = __import__(f"{PACK}.webui_ext", fromlist=["x"])
layers = __import__(f"{PACK}.webui_ext.layers", fromlist=["x"])
prompt_tags = __import__(f"{PACK}.webui_ext.prompt_tags", fromlist=["x"])
callbacks = __import__(f"{PACK}.webui_ext.callbacks", fromlist=["x"])
comfy_style = __import__(f"{PACK}.webui_ext.comfy_style", fromlist=["x"])
forge = __import__(f"{PACK}.webui_ext.forge", fromlist=["x"])
host_mod = __import__(f"{PACK}.webui_ext.host", fromlist=["x"])
AdapterFileError = pack.waveft_core.AdapterFileError  # the pack's own class (loaded under PACK)


def fake(name: str, **attrs) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attrs)
    return module


def layer(shape=(8, 8), n=5, seed=3, wavelet="db1") -> LayerAdapter:
    return LayerAdapter(torch.randn(n, generator=torch.Generator().manual_seed(seed)), shape, 25.0, wavelet, seed=seed)


# ----------------------------------------------------------------------------- host detection

HOST_NAMES = ("networks", "modules_forge", "backend.patcher.lora", "ldm_patched.modules.weight_adapter")


@pytest.fixture
def no_host(monkeypatch):
    for name in HOST_NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return monkeypatch


def importer_of(modules: dict):
    def importer(name):
        if name in modules:
            return modules[name]
        raise ModuleNotFoundError(name)

    return importer


def test_detect_outside_any_host(no_host):
    detected = host_mod.detect_host(importer_of({}))
    assert detected.kind == "unsupported" and detected.hook is None and "Lora" in detected.reason


def test_detect_a1111(no_host):
    networks = fake("networks", module_types=[])
    no_host.setitem(sys.modules, "networks", networks)
    assert host_mod.detect_host(importer_of({})) == host_mod.Host("a1111", networks)


def test_detect_forge_main(no_host):
    lora = fake("backend.patcher.lora", lora_collection_priority=[], extra_weight_calculators={})
    detected = host_mod.detect_host(importer_of({"modules_forge": fake("modules_forge"), "backend.patcher.lora": lora}))
    assert (detected.kind, detected.hook) == ("forge", lora)


def test_detect_forge_neo(no_host):
    adapters = fake("weight_adapter", adapters=[])
    lora = fake("backend.patcher.lora", weight_adapter=adapters, extra_weight_calculators={})
    detected = host_mod.detect_host(importer_of({"modules_forge": fake("modules_forge"), "backend.patcher.lora": lora}))
    assert (detected.kind, detected.hook) == ("forge-neo", adapters)


def test_detect_reforge(no_host):
    adapters = fake("ldm_patched.modules.weight_adapter", adapters=[])
    modules = {"modules_forge": fake("modules_forge"), "ldm_patched.modules.weight_adapter": adapters}
    assert host_mod.detect_host(importer_of(modules)) == host_mod.Host("reforge", adapters)


def test_detect_unknown_forge_is_unsupported_not_an_error(no_host):
    detected = host_mod.detect_host(importer_of({"modules_forge": fake("modules_forge")}))
    assert detected.kind == "unsupported" and detected.reason


def test_install_loader_on_unsupported_host_logs_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="waveft"):
        assert not webui_ext.install_loader(host_mod.Host("unsupported", None, "old Forge"))
    assert len(caplog.records) == 1 and "old Forge" in caplog.text


def test_setup_outside_a_host_only_logs(no_host, caplog):
    with caplog.at_level(logging.WARNING, logger="waveft"):
        detected = webui_ext.setup()
    assert detected.kind == "unsupported" and "nothing registered" in caplog.text


# ----------------------------------------------------------------------------- layer helpers


def test_split_and_group_waveft_tensors():
    state = {**layer().tensors("lora_unet_a"), "lora_unet_a.alpha": torch.tensor(1.0),
             "lora_unet_b.lora_up.weight": torch.zeros(2, 2)}
    groups = layers.group_layer_tensors(state)
    assert list(groups) == ["lora_unet_a"] and set(groups["lora_unet_a"]) == {
        "waveft_coef", "waveft_shape", "waveft_scale", "waveft_wavelet", "waveft_seed"}
    assert list(layers.group_layer_tensors({"lora_te2_x_q_proj.waveft_pos": torch.zeros(1)})) == ["lora_te2_x_q_proj"]


@pytest.mark.parametrize(("shape", "expected"), [((4, 6), (4, 6)), ((4, 6, 1, 1), (4, 6)), ((4, 6, 3, 3), None),
                                                 ((4,), None), (None, None)])
def test_weight_shape_2d(shape, expected):
    assert layers.weight_shape_2d(shape) == expected


def test_build_layer_refuses_foreign_tensors_and_misfits():
    tensors = {k.rpartition(".")[2]: v for k, v in layer().tensors("p").items()}
    assert layers.layer_from_tensors("p", tensors, (8, 8)).shape == (8, 8)
    with pytest.raises(AdapterFileError, match=r"p\.waveft_shape: .*8x8 weight.*8x12"):
        layers.layer_from_tensors("p", tensors, (8, 12))
    with pytest.raises(AdapterFileError, match=r"p: .*non-WaveFT.*'bias'"):
        layers.layer_from_tensors("p", {**tensors, "bias": torch.zeros(8)}, (8, 8))


def test_collect_layers_matches_and_consumes_only_loaded_prefixes():
    state = {**layer().tensors("lora_unet_a"), **layer(seed=4).tensors("lora_te1_b"), "other.weight": torch.zeros(1)}
    matched, used = layers.collect_layers(state, {"lora_unet_a": "diffusion_model.a.weight"})
    assert list(matched) == ["diffusion_model.a.weight"]
    assert used == {k for k in state if k.startswith("lora_unet_a.")}


def test_collect_layers_refuses_a_bad_file_whole(caplog):
    state = {**layer().tensors("lora_unet_a"), **layer(seed=4).tensors("lora_te1_b")}
    state["lora_te1_b.waveft_coef"] = state["lora_te1_b.waveft_coef"].double()
    with caplog.at_level(logging.ERROR, logger="waveft"):
        matched, used = layers.collect_layers(state, {"lora_unet_a": "k"})
    assert matched == {} and used == set(state) and "lora_te1_b.waveft_coef" in caplog.text


def test_collect_layers_checks_expected_shapes(caplog):
    state = layer(shape=(8, 8)).tensors("lora_unet_a")
    with caplog.at_level(logging.ERROR, logger="waveft"):
        assert layers.collect_layers(state, {"lora_unet_a": "k"}, {"lora_unet_a": (640, 640)})[0] == {}
    assert "640x640" in caplog.text


def test_sdxl_kohya_shapes_cover_attention_and_text_encoders():
    shapes = layers.sdxl_kohya_shapes()
    assert shapes["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"] == (640, 2048)
    assert shapes["lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0"] == (1280, 1280)
    assert shapes["lora_te2_text_model_encoder_layers_31_self_attn_q_proj"] == (1280, 1280)
    assert shapes["lora_te1_text_model_encoder_layers_11_mlp_fc1"] == (3072, 768)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_layer_to_weight_any_float_dtype(dtype):
    adapter = layer(shape=(6, 10), wavelet="db3")
    weight = torch.randn(6, 10).to(dtype)
    expected = (weight.float() + 0.5 * adapter.delta_weight()).to(dtype)
    result = layers.add_layer_to_weight(weight, adapter, 0.5)
    assert result is weight
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_add_layer_to_weight_on_a_1x1_conv_and_misfit(caplog):
    adapter = layer(shape=(6, 10))
    weight = torch.zeros(6, 10, 1, 1)
    layers.add_layer_to_weight(weight, adapter, 1.0)
    torch.testing.assert_close(weight[:, :, 0, 0], adapter.delta_weight())
    other = torch.zeros(6, 12)
    with caplog.at_level(logging.ERROR, logger="waveft"):
        assert torch.equal(layers.add_layer_to_weight(other, adapter, 1.0, "k"), torch.zeros(6, 12))
    assert "layer skipped" in caplog.text


# ----------------------------------------------------------------------------- Forge / comfy-style glue (fakes)


def test_forge_collection_claims_waveft_and_delegates_the_rest():
    seen = {}

    def stock_load_lora(lora, to_load):
        seen.update(lora)
        return {"stock": ("diff", (torch.zeros(1),))}, {k: v for k, v in lora.items() if k.startswith("junk")}

    forge_lora = fake("backend.patcher.lora", lora_collection_priority=[fake("stock", load_lora=stock_load_lora)],
                      extra_weight_calculators={})
    forge.register(forge_lora)
    forge.register(forge_lora)  # idempotent
    assert len(forge_lora.lora_collection_priority) == 2
    ours = forge_lora.lora_collection_priority[0]
    state = {**layer().tensors("lora_unet_a"), "junk": torch.zeros(1), "lora_unet_b.lora_up.weight": torch.zeros(1)}
    patches, remaining = ours.load_lora(state, {"lora_unet_a": "diffusion_model.a.weight"})
    assert set(seen) == {"junk", "lora_unet_b.lora_up.weight"}  # WaveFT keys never reach the stock loader
    assert patches["diffusion_model.a.weight"][0] == "waveft" and "stock" in patches and list(remaining) == ["junk"]
    weight = torch.zeros(8, 8)
    forge_lora.extra_weight_calculators["waveft"](weight, 2.0, patches["diffusion_model.a.weight"][1])
    torch.testing.assert_close(weight, 2.0 * layer().delta_weight())


def test_comfy_style_registration_uses_comfyuis_adapter_once():
    base = type("WeightAdapterBase", (), {})
    weight_adapter = fake("weight_adapter", WeightAdapterBase=base, adapters=[type("LoRAAdapter", (base,), {})])
    assert comfy_style.register(weight_adapter, "reforge")
    assert comfy_style.register(weight_adapter, "reforge")  # "Reload UI"
    assert [a.__name__ for a in weight_adapter.adapters] == ["LoRAAdapter", "WaveFTAdapter"]
    assert issubclass(weight_adapter.adapters[1], base) and weight_adapter.adapters[1].name == "waveft"


def test_comfy_style_without_an_adapter_list_is_one_log_line(caplog):
    weight_adapter = fake("weight_adapter", WeightAdapterBase=object)
    with caplog.at_level(logging.WARNING, logger="waveft"):
        assert not comfy_style.register(weight_adapter, "reforge")
    assert "will not apply" in caplog.text


# ----------------------------------------------------------------------------- prompt tags, infotext, X/Y/Z


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a <waveft:x:0.8> b", "a <waveft:x:0.5> b"),
    ("<waveft:x>", "<waveft:x:0.5>"),
    ("<waveft:x:1:0.2:te=0:unet=1:dyn=4>", "<waveft:x:0.5:dyn=4>"),
    ("<lora:y:0.8> <waveft:z:1>", "<lora:y:0.8> <waveft:z:0.5>"),
])
def test_set_strength(prompt, expected):
    assert prompt_tags.set_strength(prompt, 0.5) == expected


def test_parse_hashes_and_rewrite_aliases():
    hashes = prompt_tags.parse_hashes("old: 0123456789ab, kohya: ffffffffffff")
    assert hashes == {"old": "0123456789ab", "kohya": "ffffffffffff"}
    lookup = {"0123456789ab": "new"}.get
    assert prompt_tags.rewrite_aliases("<waveft:old:0.7> <waveft:gone:1>", hashes, lookup) == "<waveft:new:0.7> <waveft:gone:1>"
    assert prompt_tags.parse_hashes(None) == {} and prompt_tags.parse_hashes("garbage") == {}


def test_infotext_pasted_uses_the_lora_hash_lookup(monkeypatch):
    on_disk = SimpleNamespace(get_alias=lambda: "renamed")
    monkeypatch.setitem(sys.modules, "networks", fake("networks", available_network_hash_lookup={"abc": on_disk}))
    params = {"Prompt": "x <waveft:old:0.7> <lora:old:1>", "Lora hashes": "old: abc"}
    callbacks.infotext_pasted("", params)
    assert params["Prompt"] == "x <waveft:renamed:0.7> <lora:old:1>"  # <lora:...> is the Lora extension's job


def test_register_alias_without_lora_extension_warns(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "networks", fake("networks", extra_network_lora=None))
    with caplog.at_level(logging.WARNING, logger="waveft"):
        assert not callbacks.register_alias()
    assert "<waveft:...>" in caplog.text


def fake_xyz() -> ModuleType:
    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm = label, type, apply, confirm

    return fake("xyz_grid.py", AxisOption=AxisOption, axis_options=[], format_value_add_label=lambda p, opt, x: x)


def test_xyz_axis_is_added_once_and_varies_waveft_tags():
    xyz = fake_xyz()
    data = [SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)]
    assert callbacks.xyz_module(data) is xyz
    assert callbacks.add_xyz_axis(xyz) and not callbacks.add_xyz_axis(xyz)
    option = xyz.axis_options[0]
    p = SimpleNamespace(prompt="a <waveft:x:1>", hr_prompt="")
    option.confirm(p, [0.5])
    option.apply(p, 0.25, [0.25])
    assert p.prompt == "a <waveft:x:0.25>"
    with pytest.raises(RuntimeError, match="no <waveft:name> tag"):
        option.confirm(SimpleNamespace(prompt="a cat", hr_prompt=""), [0.5])


# ----------------------------------------------------------------------------- install.py and the shim


def _load_file_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_py_installs_only_what_is_missing_and_never_torch():
    installer = _load_file_module("install.py", ROOT / "install.py")
    calls = []
    launch = fake("launch", is_installed=lambda name: name != "pywt", run_pip=lambda cmd, desc=None: calls.append(cmd))
    assert installer.install(launch) == ["PyWavelets>=1.4"]
    assert calls == ['install "PyWavelets>=1.4"']
    launch.is_installed = lambda name: True
    calls.clear()
    assert installer.install(launch) == [] and calls == []
    launch.is_installed = lambda name: False
    installer.install(launch)
    assert calls and not any("torch" in call for call in calls)


def test_shim_loads_the_pack_under_its_unique_name_without_collisions(monkeypatch, no_host):
    shim_name = "waveft_a1111.py"  # A1111 names a script module after its file and keeps it out of sys.modules
    decoys = {name: fake(name) for name in ("network", "trainer", "nodes", "webui_ext", "waveft_core")}
    for name, module in decoys.items():
        monkeypatch.setitem(sys.modules, name, module)
    before = set(sys.modules)
    try:
        shim = _load_file_module(shim_name, ROOT / "scripts" / shim_name)
        assert shim.PACK_NAME == "waveft_sdxl_ext" and sys.modules["waveft_sdxl_ext"].__path__ == [str(ROOT)]
        assert shim.webui_ext is sys.modules["waveft_sdxl_ext.webui_ext"] and shim.host.kind == "unsupported"
        assert all(sys.modules[name] is module for name, module in decoys.items())  # no top-level name touched
        new = set(sys.modules) - before
        assert new and all(name.startswith("waveft_sdxl_ext") or name.partition(".")[0] in
                           {m.partition(".")[0] for m in before} for name in new)
        again = _load_file_module(shim_name, ROOT / "scripts" / shim_name)  # "Reload UI"
        assert again.webui_ext is shim.webui_ext
    finally:
        for name in [n for n in sys.modules if n.startswith("waveft_sdxl_ext")]:
            del sys.modules[name]


def test_console_logging_shows_each_line_once_with_one_prefix(capsys):
    """A1111 without --loglevel set up no handler (INFO lines vanished); with it, its format added the logger
    name to our '[WaveFT]' prefix. Our own handler prints each line once, as written."""
    logger = logging.getLogger("WaveFT")  # conftest gives every test a fresh one
    root_handler = logging.StreamHandler(sys.stdout)
    root_handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))  # A1111's --loglevel format
    logging.getLogger().addHandler(root_handler)
    try:
        webui_ext.console_logging()
        webui_ext.console_logging()  # "Reload UI" runs the shim again
        logger.info("[WaveFT] A1111: WaveFT files load through <lora:...> and <waveft:...>")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().out == "[WaveFT] A1111: WaveFT files load through <lora:...> and <waveft:...>\n"
