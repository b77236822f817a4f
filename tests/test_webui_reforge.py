"""WaveFT through reForge's REAL ComfyUI-style ``ldm_patched.modules.lora`` (``REFORGE_ROOT`` = a checkout).

reForge loads LoRA files with ComfyUI's ``load_lora``/``calculate_weight`` and a ``weight_adapter.adapters``
list; WaveFT's adapter is the ComfyUI node pack's, built on reForge's base class by
``waveft_core.comfy_protocol.register``. Third-party packages reForge imports but these tests do not use
(transformers, einops ...) are stubbed by a meta-path finder while the fixture is active.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from packs import load_pack
from safetensors.torch import load_file

from waveft_core import LayerAdapter, load_adapter, save_adapter

REFORGE_ROOT = os.environ.get("REFORGE_ROOT")
PACK = "waveft_pack_reforge_test"
D = 8
PREFIX = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
MODEL_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"

pytestmark = pytest.mark.skipif(
    not REFORGE_ROOT or not (Path(REFORGE_ROOT) / "ldm_patched/modules/weight_adapter/__init__.py").is_file(),
    reason="set REFORGE_ROOT to a reForge checkout to run the real-reForge-loader tests",
)


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)

    def __or__(self, other):
        return _Anything()


class _StubModule(ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _MissingPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of third-party packages that are not installed with do-nothing modules."""

    CANDIDATES = ("einops", "psutil", "torchvision", "transformers", "sentencepiece", "tokenizers", "av", "scipy",
                  "kornia", "torchsde", "spandrel")

    def __init__(self) -> None:
        self.missing = {name for name in self.CANDIDATES if importlib.util.find_spec(name) is None}

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in self.missing:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@pytest.fixture
def reforge(monkeypatch):
    saved = dict(sys.modules)
    finder = _MissingPackages()
    monkeypatch.setattr(sys, "argv", ["webui", "--always-cpu"])
    monkeypatch.syspath_prepend(REFORGE_ROOT)
    monkeypatch.chdir(REFORGE_ROOT)
    sys.meta_path.insert(0, finder)
    try:
        import ldm_patched.modules.options as options

        options.enable_args_parsing()
        import ldm_patched.modules.lora as lora
        import ldm_patched.modules.weight_adapter as weight_adapter

        webui_ext = __import__(f"{load_pack(PACK).__name__}.webui_ext", fromlist=["x"])
        monkeypatch.setitem(sys.modules, "modules_forge", ModuleType("modules_forge"))  # reForge has it
        host = webui_ext.detect_host()
        assert host.kind == "reforge" and host.hook is weight_adapter
        assert webui_ext.install_loader(host)
        yield SimpleNamespace(lora=lora, weight_adapter=weight_adapter, webui_ext=webui_ext)
    finally:
        sys.meta_path.remove(finder)
        tops = {name.partition(".")[0] for name in saved}
        for name in set(sys.modules) - set(saved):
            if name.partition(".")[0] not in tops:
                del sys.modules[name]
        sys.modules.update(saved)


def test_waveft_file_through_reforge_load_lora_and_calculate_weight(reforge, tmp_path):
    adapter = LayerAdapter(torch.randn(9), (D, D), 25.0, "db2", seed=4)
    path = save_adapter(tmp_path / "wf.safetensors", {PREFIX: adapter})
    delta = load_adapter(path).layers[PREFIX].delta_weight()
    patches = reforge.lora.load_lora(load_file(str(path)), {PREFIX: MODEL_KEY})
    assert isinstance(patches[MODEL_KEY], reforge.weight_adapter.WeightAdapterBase)  # reForge's own base
    weight = torch.randn(D, D)
    merged = reforge.lora.calculate_weight([(0.7, patches[MODEL_KEY], 1.0, None, None)], weight.clone(), MODEL_KEY)
    torch.testing.assert_close(merged, weight + 0.7 * delta, rtol=1e-6, atol=1e-6)


def test_registration_is_idempotent(reforge):
    reforge.webui_ext.install_loader(reforge.webui_ext.detect_host())  # "Reload UI"
    names = [a.__name__ for a in reforge.weight_adapter.adapters]
    assert names.count("WaveFTAdapter") == 1 and names[0] == "LoRAAdapter"


def test_corrupt_layer_is_an_error_naming_the_key(reforge, tmp_path):
    """reForge's loader has no per-file error handling: the adapter's error stops the load (A1111's
    extra-network error display shows it), and nothing of the file reaches the model."""
    path = save_adapter(tmp_path / "wf.safetensors", {PREFIX: LayerAdapter(torch.randn(9), (D, D), 25.0, "db1", seed=4)})
    tensors = load_file(str(path))
    tensors[f"{PREFIX}.waveft_coef"][1] = float("nan")
    with pytest.raises(ValueError, match=f"{PREFIX}.waveft_coef"):
        reforge.lora.load_lora(tensors, {PREFIX: MODEL_KEY})
