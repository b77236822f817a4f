"""The trainer as hosts and users meet it: import schemes, a diffusers SDXL-architecture UNet, the demo, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainer_toys import one_thread  # noqa: F401  (an autouse fixture)

from trainer import train_waveft
from trainer.demo import (
    diffusers_denoise,
    diffusers_name_to_prefix,
    run_demo,
    synthetic_subject,
    tiny_sdxl_unet,
)
from trainer.settings import TrainSettings
from waveft_core import WaveFTConfig, load_adapter
from waveft_core.names import kohya_name, sdxl_attention_shapes

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see trainer_toys.one_thread
    return subprocess.run(
        [sys.executable, *(["-c", textwrap.dedent(code)] if code else []), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("pack_name", ["ComfyUI-WaveFT", "waveft_a1111_ext_7f3a"])
def test_trainer_works_inside_the_pack_without_top_level_names(pack_name):
    """ComfyUI imports the repository root as a package with any folder name; A1111's shim uses a unique name.
    Inside it, ``trainer`` must resolve ``waveft_core`` relatively, never as a top-level module."""
    done = run_python(f"""
        import importlib, importlib.util, sys
        import torch
        from torch import nn
        name = {pack_name!r}
        spec = importlib.util.spec_from_file_location(name, "__init__.py", submodule_search_locations=["."])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        spec.loader.exec_module(pack)
        trainer = importlib.import_module(name + ".trainer")
        assert trainer.engine.core is sys.modules[name + ".waveft_core"]
        model = nn.Module()
        model.attn1 = nn.Module()
        model.attn1.to_q = nn.Linear(8, 8)
        data = trainer.TrainingData(torch.randn(2, 8, 1, 1), {{"c": torch.zeros(1)}})
        denoise = lambda x, t, c: model.attn1.to_q(x.flatten(1)).reshape(x.shape)
        settings = trainer.TrainSettings(steps=2, waveft=pack.waveft_core.WaveFTConfig(n_frequency=4))
        result = trainer.train_waveft(model, denoise, data, settings, name_to_prefix=lambda n: "lora_unet_" + n.replace(".", "_"))
        assert result.steps_done == 2
        top = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "waveft_core"))
        assert not top, top
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the autouse one_thread fixture
    out = tmp_path_factory.mktemp("unet") / "tiny.safetensors"
    unet = tiny_sdxl_unet(channels=(16, 32, 32))
    data = synthetic_subject(n_images=4)
    settings = TrainSettings(
        steps=3, learning_rate=1e-3, grad_accum=1, batch_size=2, waveft=WaveFTConfig(n_frequency=64)
    )
    result = train_waveft(unet, diffusers_denoise(unet), data, settings, name_to_prefix=diffusers_name_to_prefix,
                          output_path=out)  # fmt: skip
    torch.set_num_threads(threads)
    return unet, data, settings, result, out


def test_diffusers_unet_file_uses_sdxl_kohya_names(unet_run):
    _, _, _, result, out = unet_run
    sdxl = {kohya_name("unet", name) for name in sdxl_attention_shapes()}
    saved = load_adapter(out)
    assert set(saved.layers) == set(result.layers) and set(saved.layers) <= sdxl
    assert len(saved.layers) == 11 * 8  # 11 transformer blocks (depth 1) x attn1/attn2 x q, k, v, out
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in saved.layers
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0" in saved.layers


def test_diffusers_gradient_checkpointing_gives_the_same_losses(unet_run):
    _, data, settings, result, _ = unet_run
    unet = tiny_sdxl_unet(channels=(16, 32, 32))
    calls = []
    resnet = unet.up_blocks[2].resnets[0]
    original = resnet.forward

    def counting(*args, **kwargs):  # a forward hook would not see the recomputation
        calls.append(1)
        return original(*args, **kwargs)

    resnet.forward = counting
    settings = TrainSettings(**{**settings.to_dict(), "gradient_checkpointing": True})
    again = train_waveft(unet, diffusers_denoise(unet), data, settings, name_to_prefix=diffusers_name_to_prefix)
    torch.testing.assert_close(torch.tensor(again.losses), torch.tensor(result.losses), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 * 3  # each of the 3 forwards ran again in the backward: checkpointing was on
    assert not unet.is_gradient_checkpointing


def test_demo_reproduces_the_trained_model_from_the_file(tmp_path):
    numbers = run_demo(tmp_path / "demo.safetensors", steps=12, quiet=True)
    assert numbers["max_abs_diff"] < 1e-4 * max(1.0, numbers["effect"]) and numbers["effect"] > 0
    assert load_adapter(tmp_path / "demo.safetensors").metadata["ss_steps"] == "12"
    assert (tmp_path / "demo_loss.png").read_bytes().startswith(b"\x89PNG")
