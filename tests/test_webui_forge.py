"""WaveFT through Forge 2.x main's REAL ``backend/patcher/lora.py`` (``FORGE_ROOT`` = a Forge checkout).

The real ``load_lora`` (collection priority), the real ComfyUI collection behind ours and the real
``merge_lora_to_weight`` run; Forge is imported the way its probe does (``--always-cpu``, ``sentencepiece``
stubbed when missing). Host modules are removed from ``sys.modules`` after each test.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from packs import load_pack, restore_modules
from safetensors.torch import load_file

from waveft_core import LayerAdapter, load_adapter, save_adapter

FORGE_ROOT = os.environ.get("FORGE_ROOT")
PACK = "waveft_pack_forge_test"
D, CTX = 8, 12
UNET = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_"
TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
MODEL_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.{}.weight"

pytestmark = pytest.mark.skipif(
    not FORGE_ROOT or not (Path(FORGE_ROOT) / "backend/patcher/lora.py").is_file(),
    reason="set FORGE_ROOT to a Forge (2.x main) checkout to run the real-Forge-patcher tests",
)


class _Anything(ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


@pytest.fixture
def forge(monkeypatch):
    """Real ``backend.patcher.lora`` with WaveFT registered through the pack's own host detection."""
    saved = dict(sys.modules)
    monkeypatch.setattr(sys, "argv", ["webui", "--always-cpu"])
    monkeypatch.syspath_prepend(str(Path(FORGE_ROOT) / "packages_3rdparty"))
    monkeypatch.syspath_prepend(FORGE_ROOT)
    monkeypatch.chdir(FORGE_ROOT)
    if importlib.util.find_spec("sentencepiece") is None:
        sys.modules["sentencepiece"] = _Anything("sentencepiece")
    try:
        import backend.patcher.lora as forge_lora

        webui_ext = __import__(f"{load_pack(PACK).__name__}.webui_ext", fromlist=["x"])
        host = webui_ext.detect_host()
        assert host.kind == "forge" and host.hook is forge_lora
        assert webui_ext.install_loader(host)
        yield forge_lora
    finally:
        restore_modules(saved)


def _layers() -> dict[str, LayerAdapter]:
    generator = torch.Generator().manual_seed(3)
    shapes = {f"{UNET}to_q": (D, D), f"{UNET}to_k": (D, CTX), f"{TE2}q_proj": (D, D)}
    return {prefix: LayerAdapter(torch.randn(9, generator=generator), shape, 25.0, "db2" if "to_k" in prefix else "db1",
                                 seed=5 + i) for i, (prefix, shape) in enumerate(shapes.items())}


def _to_load() -> dict[str, str]:
    return {f"{UNET}{proj}": MODEL_KEY.format(proj) for proj in ("to_q", "to_k", "to_v")}


def _merge(forge_lora, patches, weight, dtype=torch.float32):
    return forge_lora.merge_lora_to_weight(patches, weight, "test", computation_dtype=dtype)


def test_waveft_patch_merges_to_strength_times_dw(forge, tmp_path):
    path = save_adapter(tmp_path / "wf.safetensors", _layers())
    deltas = {p: layer.delta_weight() for p, layer in load_adapter(path).layers.items()}
    lora = load_file(str(path))
    lora["junk.weight"] = torch.zeros(1)
    patches, remaining = forge.load_lora(lora, _to_load())
    assert set(patches) == {MODEL_KEY.format("to_q"), MODEL_KEY.format("to_k")}
    assert sorted(remaining) == sorted(["junk.weight"] + [k for k in lora if k.startswith(TE2)])  # te: 2nd pass
    for proj, shape in (("to_q", (D, D)), ("to_k", (D, CTX))):
        weight = torch.randn(shape)
        merged = _merge(forge, [[0.7, patches[MODEL_KEY.format(proj)], 1.0, None, None]], weight)
        torch.testing.assert_close(merged, weight + 0.7 * deltas[f"{UNET}{proj}"], rtol=1e-6, atol=1e-6)
        half = _merge(forge, [[0.7, patches[MODEL_KEY.format(proj)], 1.0, None, None]], weight.half(), torch.float16)
        expected_half = (weight.half().float() + 0.7 * deltas[f"{UNET}{proj}"]).half()  # one rounding, in fp32
        torch.testing.assert_close(half, expected_half, rtol=1e-3, atol=1e-3)  # Forge online mode: fp16 merge


def test_lora_and_waveft_on_one_weight(forge, tmp_path):
    path = save_adapter(tmp_path / "wf.safetensors", _layers())
    delta = load_adapter(path).layers[f"{UNET}to_q"].delta_weight()
    up, down = torch.randn(D, 2), torch.randn(2, D)
    kohya = {f"{UNET}to_q.lora_up.weight": up, f"{UNET}to_q.lora_down.weight": down, f"{UNET}to_q.alpha": torch.tensor(1.0)}
    lora_patches, _ = forge.load_lora(kohya, _to_load())
    waveft_patches, _ = forge.load_lora(load_file(str(path)), _to_load())
    key = MODEL_KEY.format("to_q")
    weight = torch.randn(D, D)
    merged = _merge(forge, [[0.5, lora_patches[key], 1.0, None, None], [0.7, waveft_patches[key], 1.0, None, None]], weight)
    torch.testing.assert_close(merged, weight + 0.5 * 0.5 * (up @ down) + 0.7 * delta, rtol=0, atol=1e-5)


def test_corrupt_file_is_refused_whole_with_a_clear_log_line(forge, tmp_path, caplog):
    lora = load_file(str(save_adapter(tmp_path / "wf.safetensors", _layers())))
    lora[f"{TE2}q_proj.waveft_coef"][2] = float("inf")  # a layer the UNet pass does not even load
    with caplog.at_level(logging.ERROR, logger="waveft"):
        patches, remaining = forge.load_lora(lora, _to_load())
    assert patches == {} and remaining == {}  # nothing applied, nothing reported as "unmatched"
    assert f"{TE2}q_proj.waveft_coef" in caplog.text


def test_registration_is_idempotent_and_keeps_comfy_behind_ours(forge):
    webui_ext = sys.modules[f"{PACK}.webui_ext"]
    webui_ext.install_loader(webui_ext.detect_host())  # "Reload UI"
    names = [getattr(c, "__name__", "") for c in forge.lora_collection_priority]
    assert names.count("waveft_forge_collection") == 1 and names[0] == "waveft_forge_collection"
    assert forge.get_function("model_lora_keys_unet") is not None  # still served by the stock collections


def test_misfit_weight_is_skipped_not_crashed(forge, caplog):
    layer = LayerAdapter(torch.ones(4), (D, D), 25.0, "db1", seed=1)
    weight = torch.randn(D, CTX)
    with caplog.at_level(logging.ERROR, logger="waveft"):
        merged = _merge(forge, [[1.0, ("waveft", layer), 1.0, None, None]], weight)
    assert torch.equal(merged, weight) and "layer skipped" in caplog.text
