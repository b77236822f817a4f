"""WaveFT through the REAL A1111 v1.10 builtin Lora extension (``WEBUI_ROOT`` = a v1.10 checkout).

The real ``network.py``, ``networks.py``, ``lora_patches.py``, ``extra_networks_lora.py`` and the real
``modules/extra_networks.py`` / ``modules/patches.py`` run; only what needs a GPU or the full UI is a small
stand-in (``modules.shared``, ``devices``, ``sd_models``, ``hashes``, ``errors`` ..., ``gradio``,
``einops``), as in a webui process with ``--no-half``. The model is a tiny SDXL-shaped stand-in with
A1111's module paths: both text encoders (te2 with OpenCLIP's fused ``nn.MultiheadAttention``) and a
UNet attention block. Stand-ins are removed and torch's patched classes restored after each test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from packs import load_pack, restore_modules
from safetensors.torch import load_file, save_file
from torch import nn

from waveft_core import LayerAdapter, load_adapter, save_adapter

WEBUI_ROOT = os.environ.get("WEBUI_ROOT")
PACK = "waveft_pack_a1111_test"
D, CTX = 16, 24

pytestmark = pytest.mark.skipif(
    not WEBUI_ROOT or not (Path(WEBUI_ROOT) / "extensions-builtin/Lora/networks.py").is_file(),
    reason="set WEBUI_ROOT to an AUTOMATIC1111 v1.10 checkout to run the real-Lora-extension tests",
)


# ----------------------------------------------------------------------------- stand-ins and model


def _module(name: str, **attrs) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _load_real(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["modules"], name.rpartition(".")[2], module)
    return module


def _walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path):
        for name in sorted(files):
            if allowed_extensions is None or os.path.splitext(name)[1].lower() in allowed_extensions:
                yield os.path.join(root, name)


def _read_metadata(filename):
    with open(filename, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)).get("__metadata__", {})


def _sha256(filename, title, use_addnet_hash=False):
    return hashlib.sha256(Path(filename).read_bytes()).hexdigest()


def _install_standins(root: Path, lora_dir: Path, errors: list) -> SimpleNamespace:
    class Opts(SimpleNamespace):
        def onchange(self, *args, **kwargs):
            pass

    opts = Opts(lora_functional=False, lora_in_memory_limit=0, lora_preferred_name="Alias from file",
                lora_not_found_warning_console=False, lora_not_found_gradio_warning=False,
                lora_add_hashes_to_infotext=True, lora_bundled_ti_to_infotext=True, sd_lora="None",
                extra_networks_default_multiplier=1.0)
    _module("gradio", Warning=lambda message: None)
    _module("einops", rearrange=None)
    _module("modules", __path__=[])
    shared = _module("modules.shared", opts=opts, sd_model=None, walk_files=_walk_files,
                     cmd_opts=SimpleNamespace(lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir / "LyCORIS")))
    _module("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
            cond_cast_unet=lambda x: x, torch_gc=lambda: None)
    _module("modules.sd_models", read_state_dict=lambda filename, **_: load_file(filename, device="cpu"),
            read_metadata_from_safetensors=_read_metadata)
    _module("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    _module("modules.errors", display=lambda e, task, **_: errors.append((task, str(e))),
            report=lambda message, exc_info=False: errors.append(("report", message)))
    _module("modules.hashes", sha256_from_cache=_sha256, sha256=_sha256)
    embedding_db = SimpleNamespace(word_embeddings={}, expected_shape=-1, skipped_embeddings={},
                                   register_embedding=lambda *a: None, register_embedding_by_name=lambda *a: None)
    _module("modules.sd_hijack", model_hijack=SimpleNamespace(embedding_db=embedding_db, comments=[]))
    _module("modules.scripts", scripts_txt2img=SimpleNamespace(infotext_fields=[]))
    _module("modules.textual_inversion", __path__=[])
    _module("modules.textual_inversion.textual_inversion", create_embedding_from_data=None)
    _module("modules.models", __path__=[])
    _module("modules.models.sd3", __path__=[])
    _module("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (nn.Linear,), {}))
    _load_real("modules.patches", root / "modules/patches.py")
    _load_real("modules.extra_networks", root / "modules/extra_networks.py")
    return shared


def _ns(**children) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


class _Embedder(nn.Module):
    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped


def tiny_sdxl() -> SimpleNamespace:
    """A1111's SDXL layout in miniature (module paths as sd_hijack leaves them)."""
    torch.manual_seed(0)
    attn = _ns(q_proj=nn.Linear(D, D), k_proj=nn.Linear(D, D), v_proj=nn.Linear(D, D), out_proj=nn.Linear(D, D))
    te1 = _ns(transformer=_ns(text_model=_ns(encoder=_ns(layers=nn.ModuleList([
        _ns(self_attn=attn, mlp=_ns(fc1=nn.Linear(D, 2 * D), fc2=nn.Linear(2 * D, D)))])))))
    te2 = _ns(model=_ns(transformer=_ns(resblocks=nn.ModuleList([
        _ns(attn=nn.MultiheadAttention(D, 2), mlp=_ns(c_fc=nn.Linear(D, 2 * D), c_proj=nn.Linear(2 * D, D)))]))))

    def attention(context: int) -> nn.Module:
        return _ns(to_q=nn.Linear(D, D), to_k=nn.Linear(context, D), to_v=nn.Linear(context, D),
                   to_out=nn.ModuleList([nn.Linear(D, D)]))

    block = _ns(transformer_blocks=nn.ModuleList([_ns(attn1=attention(D), attn2=attention(CTX))]))
    unet = _ns(diffusion_model=_ns(input_blocks=nn.ModuleList([nn.ModuleList() for _ in range(4)] + [
        nn.ModuleList([nn.Identity(), block])])))
    for part in (te1, te2, unet):
        part.requires_grad_(False)  # A1111 runs inference with frozen weights
    conditioner = SimpleNamespace(embedders=[_Embedder(te1), _Embedder(te2), nn.Identity()])
    return SimpleNamespace(is_sdxl=True, is_sd1=False, is_sd2=False, conditioner=conditioner, model=unet,
                           te1=te1, te2=te2, unet=unet)


UNET = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
TE1 = "lora_te1_text_model_encoder_layers_0_"
TE2 = "lora_te2_text_model_encoder_layers_0_"


def waveft_layers() -> dict[str, LayerAdapter]:
    """kohya prefix -> layer: UNet attn1/attn2 (incl. a 16x24 to_k), te1, te2 fused q/k/v/out and an MLP."""
    shapes = {f"{UNET}attn1_{p}": (D, D) for p in ("to_q", "to_k", "to_v", "to_out_0")}
    shapes.update({f"{UNET}attn2_to_k": (D, CTX), f"{UNET}attn2_to_q": (D, D)})
    shapes.update({f"{TE1}self_attn_q_proj": (D, D), f"{TE1}mlp_fc1": (2 * D, D)})
    shapes.update({f"{TE2}self_attn_{p}_proj": (D, D) for p in ("q", "k", "v", "out")})
    shapes[f"{TE2}mlp_fc1"] = (2 * D, D)
    generator = torch.Generator().manual_seed(1)
    layers = {}
    for index, (prefix, shape) in enumerate(shapes.items()):
        coef = torch.randn(7 + index, generator=generator)
        wavelet = "db2" if index % 3 == 1 else "db1"
        if index % 4 == 2:
            positions = torch.randperm(shape[0] * shape[1], generator=generator)[: coef.numel()]
            layers[prefix] = LayerAdapter(coef, shape, 10.0, wavelet, positions=positions)
        else:
            layers[prefix] = LayerAdapter(coef, shape, 25.0, wavelet, seed=100 + index)
    return layers


def module_for(model: SimpleNamespace, prefix: str):
    """(module, forward input) of the tiny model that a kohya prefix adapts; MHA for te2 self-attention."""
    if prefix.startswith(UNET):
        attn, proj = prefix[len(UNET):].split("_", 1)
        block = model.unet.diffusion_model.input_blocks[4][1].transformer_blocks[0]
        module = getattr(block, attn)
        return (module.to_out[0] if proj == "to_out_0" else getattr(module, proj)), None
    if prefix.startswith(TE1):
        layer = model.te1.transformer.text_model.encoder.layers[0]
        part = prefix[len(TE1):]
        return (layer.mlp.fc1 if part == "mlp_fc1" else getattr(layer.self_attn, part.removeprefix("self_attn_"))), None
    block = model.te2.model.transformer.resblocks[0]
    return (block.mlp.c_fc if prefix.endswith("mlp_fc1") else block.attn), None


def run_forwards(model: SimpleNamespace) -> None:
    """Every patched layer applies the loaded networks on its next forward (network_apply_weights)."""
    with torch.no_grad():
        for part in (model.te1, model.te2, model.unet):
            for module in part.modules():
                if isinstance(module, nn.MultiheadAttention):
                    x = torch.zeros(1, 1, D)
                    module(x, x, x)
                elif type(module) is nn.Linear:
                    module(torch.zeros(1, module.in_features))


def snapshot(model: SimpleNamespace) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for part in ("te1", "te2", "unet")
            for name, tensor in getattr(model, part).state_dict(prefix=f"{part}.").items()}


def current_weight(model: SimpleNamespace, prefix: str) -> torch.Tensor:
    module, _ = module_for(model, prefix)
    if isinstance(module, nn.MultiheadAttention):
        if prefix.endswith("out_proj"):
            return module.out_proj.weight.detach().clone()
        index = "qkv".index(prefix[-6])
        return module.in_proj_weight.detach().chunk(3, 0)[index].clone()
    return module.weight.detach().clone()


# ----------------------------------------------------------------------------- the fixture


@pytest.fixture
def a1111(tmp_path):
    """Real Lora extension + stand-ins + tiny model + WaveFT registered as the shim would; cleaned up after."""
    root = Path(WEBUI_ROOT)
    saved_modules, saved_path = dict(sys.modules), list(sys.path)
    errors: list = []
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shared = _install_standins(root, lora_dir, errors)
    model = tiny_sdxl()
    shared.sd_model = model
    sys.path.insert(0, str(root / "extensions-builtin/Lora"))
    originals = None
    try:
        import extra_networks_lora
        import lora_patches
        import networks

        originals = networks.originals = lora_patches.LoraPatches()  # what scripts/lora_script.py does
        networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()  # ... and its before_ui
        sys.modules["modules.extra_networks"].register_extra_network(networks.extra_network_lora)
        networks.assign_network_names_to_compvis_modules(model)  # on_model_loaded
        pack = load_pack(PACK)
        webui_ext = __import__(f"{PACK}.webui_ext", fromlist=["x"])
        host = webui_ext.detect_host()
        assert host.kind == "a1111"
        assert webui_ext.install_loader(host)
        callbacks = __import__(f"{PACK}.webui_ext.callbacks", fromlist=["x"])
        assert callbacks.register_alias()  # on_app_started
        yield SimpleNamespace(networks=networks, model=model, lora_dir=lora_dir, errors=errors, shared=shared,
                              extra_networks=sys.modules["modules.extra_networks"], webui_ext=webui_ext,
                              callbacks=callbacks, pack=pack, hijack=sys.modules["modules.sd_hijack"].model_hijack)
    finally:
        if originals is not None:
            originals.undo()
        restore_modules(saved_modules)
        sys.path[:] = saved_path


def generate(env: SimpleNamespace, prompt: str) -> SimpleNamespace:
    """What processing.py does around sampling: parse, activate, run the model (forwards), deactivate."""
    env.hijack.comments = []
    p = SimpleNamespace(all_prompts=[prompt], extra_generation_params={}, scripts=None, comments=[],
                        comment=lambda text: p.comments.append(text))
    p.prompts, data = env.extra_networks.parse_prompts([prompt])
    env.extra_networks.activate(p, data)
    run_forwards(env.model)
    env.extra_networks.deactivate(p, data)
    return p


def write_waveft(env: SimpleNamespace, name: str = "wf") -> dict[str, torch.Tensor]:
    """Save the test adapter with waveft_core and rescan; returns prefix -> dense dW (the oracle)."""
    path = save_adapter(env.lora_dir / f"{name}.safetensors", waveft_layers())
    env.networks.list_available_networks()
    return {prefix: layer.delta_weight() for prefix, layer in load_adapter(path).layers.items()}


def write_kohya_lora(env: SimpleNamespace, name: str = "kohya") -> dict[str, torch.Tensor]:
    """A tiny real kohya LoRA (rank 2, alpha 1) on attn1.to_q and te1 q_proj; returns prefix -> dW."""
    generator = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for prefix in (f"{UNET}attn1_to_q", f"{TE1}self_attn_q_proj"):
        up, down = torch.randn(D, 2, generator=generator), torch.randn(2, D, generator=generator)
        tensors.update({f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
                        f"{prefix}.alpha": torch.tensor(1.0)})
        deltas[prefix] = (up @ down) * 0.5
    save_file(tensors, str(env.lora_dir / f"{name}.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    env.networks.list_available_networks()
    return deltas


def assert_shifted(env, before, deltas, multiplier, prefixes=None):
    for prefix in prefixes or deltas:
        expected = before[prefix] + multiplier * deltas[prefix]
        torch.testing.assert_close(current_weight(env.model, prefix), expected, rtol=0, atol=1e-6, msg=prefix)


# ----------------------------------------------------------------------------- tests


def test_file_is_listed_as_sdxl_network_with_metadata_and_hash(a1111):
    write_waveft(a1111)
    on_disk = a1111.networks.available_networks["wf"]
    assert on_disk.sd_version.name == "SDXL"  # shown on the Lora page when an SDXL model is loaded
    assert on_disk.metadata["ss_network_module"] == "waveft"
    assert len(on_disk.shorthash) == 12


def test_waveft_tag_applies_strength_times_dw_to_every_layer(a1111):
    deltas = write_waveft(a1111)
    before = {prefix: current_weight(a1111.model, prefix) for prefix in deltas}
    p = generate(a1111, "a cat <waveft:wf:0.7>")
    assert not a1111.errors and not p.comments
    assert_shifted(a1111, before, deltas, 0.7)
    shorthash = a1111.networks.available_networks["wf"].shorthash
    assert p.extra_generation_params["Lora hashes"] == f"wf: {shorthash}"
    assert "<waveft:wf:0.7>" in p.all_prompts[0]  # infotext keeps the tag as typed


def test_lora_tag_applies_the_same_file(a1111):
    deltas = write_waveft(a1111)
    before = {prefix: current_weight(a1111.model, prefix) for prefix in deltas}
    generate(a1111, "a cat <lora:wf:0.5>")
    assert_shifted(a1111, before, deltas, 0.5)


def test_te_zero_leaves_text_encoders_alone(a1111):
    deltas = write_waveft(a1111)
    before_all = snapshot(a1111.model)
    before = {prefix: current_weight(a1111.model, prefix) for prefix in deltas}
    generate(a1111, "a cat <waveft:wf:te=0:unet=0.7>")
    after = snapshot(a1111.model)
    for name in before_all:
        if name.startswith(("te1.", "te2.")):
            assert torch.equal(after[name], before_all[name]), name
    assert_shifted(a1111, before, deltas, 0.7, [p for p in deltas if p.startswith(UNET)])


def test_dropping_the_tag_restores_the_weights(a1111):
    write_waveft(a1111)
    before = snapshot(a1111.model)
    generate(a1111, "a cat <waveft:wf:1.3>")
    assert any(not torch.equal(before[k], v) for k, v in snapshot(a1111.model).items())
    generate(a1111, "a cat")
    after = snapshot(a1111.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_and_waveft_together(a1111):
    waveft = write_waveft(a1111)
    lora = write_kohya_lora(a1111)
    before = {prefix: current_weight(a1111.model, prefix) for prefix in waveft}
    p = generate(a1111, "a cat <lora:kohya:0.5> <waveft:wf:0.7>")
    assert not a1111.errors
    for prefix in waveft:
        expected = before[prefix] + 0.7 * waveft[prefix] + 0.5 * lora.get(prefix, torch.zeros_like(waveft[prefix]))
        torch.testing.assert_close(current_weight(a1111.model, prefix), expected, rtol=0, atol=1e-5, msg=prefix)
    assert set(p.extra_generation_params["Lora hashes"].replace(",", "").split()[::2]) == {"kohya:", "wf:"}


def test_module_type_registration_is_idempotent(a1111):
    types = a1111.networks.module_types
    a1111.webui_ext.install_loader(a1111.webui_ext.detect_host())  # "Reload UI" runs the shim again
    assert sum(type(t).__name__ == "ModuleTypeWaveFT" for t in types) == 1
    assert type(types[0]).__name__ == "ModuleTypeLora"  # builtin types keep their priority


def test_pasted_infotext_follows_a_renamed_file(a1111):
    write_waveft(a1111, "old_name")
    shorthash = a1111.networks.available_networks["old_name"].shorthash
    (a1111.lora_dir / "old_name.safetensors").rename(a1111.lora_dir / "new_name.safetensors")
    a1111.networks.list_available_networks()
    params = {"Prompt": "a cat <waveft:old_name:0.7>", "Lora hashes": f"old_name: {shorthash}"}
    a1111.callbacks.infotext_pasted("", params)
    # the file's alias is its ss_output_name ("old_name"), and the hash finds the renamed file
    assert params["Prompt"] == f"a cat <waveft:{a1111.networks.available_network_hash_lookup[shorthash].get_alias()}:0.7>"
    a1111.shared.opts.lora_preferred_name = "Filename"
    params = {"Prompt": "a cat <waveft:old_name:0.7>", "Lora hashes": f"old_name: {shorthash}"}
    a1111.callbacks.infotext_pasted("", params)
    assert params["Prompt"] == "a cat <waveft:new_name:0.7>"


def _corrupt(tensors: dict, how: str) -> tuple[dict, str]:
    """Damage one layer (te2 v_proj, applied late) of a good file; returns (tensors, the prefix the error must name)."""
    prefix = f"{TE2}self_attn_v_proj"
    if how == "nan":
        tensors[f"{prefix}.waveft_coef"][0] = float("nan")
    elif how == "positions":
        tensors.pop(f"{prefix}.waveft_seed", None)
        tensors[f"{prefix}.waveft_pos"] = torch.arange(tensors[f"{prefix}.waveft_coef"].numel()) + D * D - 3
    elif how == "shape":
        tensors[f"{prefix}.waveft_shape"] = torch.tensor([D, CTX])
    elif how == "wavelet":
        tensors[f"{prefix}.waveft_wavelet"] = torch.tensor(list(b"../../etc"), dtype=torch.uint8)
    elif how == "dtype":
        tensors[f"{prefix}.waveft_coef"] = tensors[f"{prefix}.waveft_coef"].to(torch.int32)  # half floats are read (core trainer files)
    else:
        tensors[f"{prefix}.alpha"] = torch.tensor(4.0)
    return tensors, prefix


@pytest.mark.parametrize("how", ["nan", "positions", "shape", "wavelet", "dtype", "alpha"])
def test_corrupt_file_is_a_clear_error_and_touches_nothing(a1111, how):
    path = save_adapter(a1111.lora_dir / "bad.safetensors", waveft_layers())
    tensors, prefix = _corrupt(dict(load_file(str(path))), how)
    save_file(tensors, str(path), metadata=_read_metadata(path))
    lora = write_kohya_lora(a1111)
    a1111.networks.list_available_networks()
    before = snapshot(a1111.model)
    before_q = current_weight(a1111.model, f"{UNET}attn1_to_q")
    p = generate(a1111, "a cat <waveft:bad:1> <lora:kohya:0.5>")
    (task, message), = a1111.errors
    assert task.startswith("loading network") and prefix in message and "WaveFT" in message
    assert any(prefix in comment for comment in a1111.hijack.comments)  # shown under the image
    assert not p.comments
    after = snapshot(a1111.model)
    # nothing of the bad file was applied; the good LoRA next to it still was
    torch.testing.assert_close(current_weight(a1111.model, f"{UNET}attn1_to_q"), before_q + 0.5 * lora[f"{UNET}attn1_to_q"],
                               rtol=0, atol=1e-6)
    untouched = [k for k in before if "attn1.to_q" not in k and "self_attn.q_proj" not in k]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_training_starts_from_restored_unet_weights(a1111):
    """The Train tab restores LoRA-patched UNet layers through the extension's own path (WaveFT-wrapped
    Linears are never called themselves, so A1111's lazy restore on forward would not reach them)."""
    write_waveft(a1111)
    before = snapshot(a1111.model)
    generate(a1111, "a cat <waveft:wf:1>")
    train_a1111 = __import__(f"{PACK}.webui_ext.train_a1111", fromlist=["x"])
    train_a1111.release_networks(a1111.networks, a1111.model.unet)
    after = snapshot(a1111.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    assert a1111.networks.loaded_networks == []
    run_forwards(a1111.model)  # text encoders restore themselves on their next forward
    assert all(torch.equal(before[k], v) for k, v in snapshot(a1111.model).items())


def test_the_shim_sets_everything_up_like_a1111_loads_it(a1111):
    """scripts/waveft_a1111.py executed the way A1111's script loader does (module named after the file)."""
    registered: dict[str, list] = {}

    def recorder(name):
        return lambda callback, **_: registered.setdefault(name, []).append(callback)

    events = ("on_app_started", "on_infotext_pasted", "on_before_ui", "on_model_loaded", "on_ui_tabs")
    _module("modules.script_callbacks", **{event: recorder(event) for event in events})
    shim_path = Path(__file__).resolve().parent.parent / "scripts" / "waveft_a1111.py"
    spec = importlib.util.spec_from_file_location("waveft_a1111.py", shim_path)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)  # (its console handler on the WaveFT logger is undone by conftest)
    assert shim.host.kind == "a1111" and "waveft_a1111.py" not in sys.modules
    assert sum(type(t).__name__ == "ModuleTypeWaveFT" for t in a1111.networks.module_types) == 1
    assert sorted(registered) == sorted(events)
    for callback in registered["on_app_started"]:
        callback(None, None)
    deltas = write_waveft(a1111)
    before = {prefix: current_weight(a1111.model, prefix) for prefix in deltas}
    generate(a1111, "a cat <waveft:wf:0.4>")
    assert_shifted(a1111, before, deltas, 0.4)


def test_te2_attention_needs_q_k_v_and_out_like_every_network_type(a1111):
    """A1111 applies OpenCLIP's fused attention only when q, k, v and out_proj are all in the file
    (networks.py, MultiheadAttention branch); a partial set is skipped there, as for LoRA, not a crash."""
    layers = {p: layer for p, layer in waveft_layers().items() if p.startswith(UNET) or p == f"{TE2}self_attn_q_proj"}
    path = save_adapter(a1111.lora_dir / "partial.safetensors", layers)
    a1111.networks.list_available_networks()
    before = snapshot(a1111.model)
    generate(a1111, "a cat <waveft:partial:1>")
    after = snapshot(a1111.model)
    assert not a1111.errors
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("te2."))
    delta = load_adapter(path).layers[f"{UNET}attn1_to_q"].delta_weight()
    key = "unet.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(after[key], before[key] + delta, rtol=0, atol=1e-6)
