"""WaveFT Train and WaveFT Save in a real ComfyUI (``COMFYUI_PATH``): a few steps on a tiny SDXL-layout model,
run by ComfyUI's executor (so under its ``torch.inference_mode``), progress per step, Cancel, saving.
"""

from __future__ import annotations

import pytest
import torch
from comfy_host import boot, pack_module, require_comfy, run_prompt, small_sdxl_clip, tiny_clip, tiny_sdxl, tiny_vae

from waveft_core import load_adapter

require_comfy()

TRAIN = {
    "instance_prompt": "a photo of zjw dog", "budget": 48, "wavelet": "db1", "scaling": 25.0, "steps": 3,
    "learning_rate": 1e-2, "batch_size": 1, "grad_accumulation": 1, "resolution": 32, "seed": 5,
    "target_pattern": r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$", "gradient_checkpointing": True,
    "precision": "no", "name": "zjw",
}  # fmt: skip


@pytest.fixture(scope="module")
def host():
    return boot()


@pytest.fixture
def progress_calls():
    """Install a progress hook like ComfyUI's server does (it also raises on Cancel)."""
    import comfy.model_management as mm
    import comfy.utils

    calls: list[tuple[int, int]] = []
    stop_at: list[int] = []
    crash: list[bool] = []  # [True]: fail at stop_at with an error instead of a Cancel, once

    def hook(value, total, preview, node_id=None):
        calls.append((value, total))
        if stop_at and value >= stop_at[0] and crash:
            crash.clear()
            raise RuntimeError("CUDA out of memory (simulated)")
        if stop_at and value >= stop_at[0]:
            mm.interrupt_current_processing(True)  # the user presses Cancel ...
        mm.throw_exception_if_processing_interrupted()  # ... and the server's hook raises

    previous = comfy.utils.PROGRESS_BAR_HOOK
    throttle = getattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", None)
    comfy.utils.set_progress_bar_global_hook(hook)
    if throttle is not None:  # newer ComfyUI sends at most one update per 0.1 s; these steps are faster
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
    yield calls, stop_at, crash
    comfy.utils.set_progress_bar_global_hook(previous)
    if throttle is not None:
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = throttle
    mm.interrupt_current_processing(False)


def _prompt(steps: int = 3, name: str = "zjw", **extra) -> dict:
    return {
        "1": {"class_type": "WaveFTTestTinyModels", "inputs": {"seed": 0}},
        "2": {"class_type": "WaveFTTestImages", "inputs": {}},
        "3": {"class_type": "WaveFTTrain", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                                                     **{**TRAIN, "steps": steps, "name": name, **extra}}},
        "4": {"class_type": "WaveFTSave", "inputs": {"waveft": ["3", 1], "filename": f"subjects/{name}", "folder": "waveft"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }


def test_train_and_save_through_the_executor(host, progress_calls):
    calls, _, _ = progress_calls
    executor, _ = run_prompt(_prompt())
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    assert calls[-3:] == [(1, 3), (2, 3), (3, 3)]
    saved = executor.history_result["outputs"]["4"]["text"][0]
    assert saved.endswith("subjects/zjw.safetensors")
    adapter = load_adapter(saved)
    assert len(adapter.layers) == 4 * 2 * 11  # q, k, v, out of attn1 + attn2 in the 11 transformer blocks
    assert all(layer.num_params == 48 for layer in adapter.layers.values())
    assert any(layer.coef.abs().sum() > 0 for layer in adapter.layers.values())
    assert adapter.metadata["ss_output_name"] == "zjw" and adapter.metadata["ss_num_train_images"] == "3"
    assert adapter.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    save = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTSave"]
    again = save.execute(adapter, "subjects/zjw", "waveft").ui["text"][0]  # never overwrites
    assert again.endswith("subjects/zjw_001.safetensors") and load_adapter(saved).metadata["ss_output_name"] == "zjw"
    escaped = save.execute(adapter, "../../outside/../x", "loras").ui["text"][0]
    assert escaped == str(host["work"] / "models" / "loras" / "outside" / "x.safetensors")


def test_trained_model_output_equals_the_adapter_applied(host):
    import comfy.model_management as mm

    train = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTTrain"]
    model = tiny_sdxl(seed=1)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    images = [torch.rand(1, 32, 32, 3)]
    with torch.inference_mode():  # as under ComfyUI's executor
        output = train.execute([model], [tiny_clip()], [tiny_vae()], images, **{k: [v] for k, v in TRAIN.items()})
        trained, adapter, plot, trained_clip = output.args
        assert plot.shape == (1, 256, 512, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
        mm.unload_all_models()
        for key, value in model.model.state_dict().items():
            assert torch.equal(value, before[key]), f"training changed the base model: {key}"
        assert not model.patches and len(trained.patches) == len(adapter.layers)
        mm.load_models_gpu([trained])
        state = trained.model.state_dict()
        unet_map = pack_module("nodes.comfy_patching").ModelKeys(model, None).unet_map
        for prefix, layer in adapter.layers.items():
            key = unet_map[prefix]
            assert torch.equal(state[key], layer.add_to_(before[key].clone(), 1.0)), key
        mm.unload_all_models()


def test_text_encoders_train_too_when_asked(host):
    """With a text-encoder pattern the encoders run in the loop: their layers are trained, saved under
    ``lora_te1_``/``lora_te2_``, and the CLIP output applies them (the input CLIP is left as it was); the
    WaveFT Apply node puts the same layers on the input CLIP."""
    import comfy.model_management as mm

    nodes = host["nodes"].NODE_CLASS_MAPPINGS
    model, clip = tiny_sdxl(seed=3), tiny_clip()
    tokens = clip.tokenize("a photo of zjw dog")
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    plain = clip.encode_from_tokens(tokens)
    options = {**TRAIN, "name": "with_te", "text_encoder_pattern": r"self_attn\.(q_proj|v_proj|out_proj)$|mlp\.fc1$"}
    with torch.inference_mode():
        output = nodes["WaveFTTrain"].execute([model], [clip], [tiny_vae()], [torch.rand(1, 32, 32, 3)],
                                              **{k: [v] for k, v in options.items()})
        _, adapter, _, trained_clip = output.args
        te_layers = {p: layer for p, layer in adapter.layers.items() if p.startswith(("lora_te1_", "lora_te2_"))}
        assert set(te_layers) == {f"lora_te{i}_text_model_encoder_layers_0_{name}" for i in (1, 2)
                                  for name in ("self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1")}
        assert all(layer.coef.abs().sum() > 0 for layer in te_layers.values())
        assert len(adapter.layers) - len(te_layers) == 4 * 2 * 11  # and the UNet's attention, as without
        mm.unload_all_models()
        for key, value in clip.cond_stage_model.state_dict().items():
            assert torch.equal(value, before[key]), f"training changed the input CLIP: {key}"
        assert torch.equal(clip.encode_from_tokens(tokens), plain)
        trained = trained_clip.encode_from_tokens(tokens)
        assert not torch.allclose(trained, plain)
        _, applied = nodes["WaveFTApply"].execute(model, adapter, 1.0, 1.0, clip=clip).args
        torch.testing.assert_close(applied.encode_from_tokens(tokens), trained)


def test_a_text_encoder_pattern_that_selects_nothing_is_an_error(host):
    train = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTTrain"]
    options = {**TRAIN, "name": "te_typo", "text_encoder_pattern": r"self_atn\.q_proj$"}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"matches none of the text encoders' 12 Linear layers.*text_model\.encoder"):
        train.execute([tiny_sdxl(seed=7)], [tiny_clip()], [tiny_vae()], [torch.rand(1, 32, 32, 3)], **{k: [v] for k, v in options.items()})


def test_text_encoders_of_comfyuis_real_sdxl_clip_train(host):
    """Through ComfyUI's real SDXL CLIP classes (cut to three layers): every adapted layer that can reach the
    conditioning is trained, with prompt weights too."""
    import comfy.model_management as mm

    train = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTTrain"]
    options = {**TRAIN, "instance_prompt": "a photo of (zjw:1.2) dog", "name": "real_clip", "text_encoder_pattern": r"self_attn\.(q_proj|v_proj)$"}
    with torch.inference_mode():
        output = train.execute([tiny_sdxl(seed=4)], [small_sdxl_clip()], [tiny_vae()], [torch.rand(1, 32, 32, 3)],
                               **{k: [v] for k, v in options.items()})
    te = {p: layer for p, layer in output.args[1].layers.items() if p.startswith("lora_te")}
    # CLIP-L's output is its penultimate layer: its last layer (index 2) cannot change the conditioning
    assert len(te) == 12 and {p for p, layer in te.items() if layer.coef.abs().sum() == 0} == {
        "lora_te1_text_model_encoder_layers_2_self_attn_q_proj", "lora_te1_text_model_encoder_layers_2_self_attn_v_proj"}
    mm.unload_all_models()


def test_in_loop_conditioning_gradients_equal_an_out_of_place_clip(host, monkeypatch):
    """ComfyUI's CLIP layers add residuals in place after their norms saved the input; the conditioning is
    computed so that the gradients equal those of the same CLIP written out of place."""
    import comfy.clip_model

    from waveft_core import WaveFTConfig, attach_waveft

    comfy_model, patches = pack_module("nodes.comfy_model"), pack_module("nodes.patches")
    clip = small_sdxl_clip(seed=5)
    encoders = torch.nn.ModuleDict(patches.text_encoders(clip)).requires_grad_(False)
    layers = attach_waveft(encoders, WaveFTConfig(n_frequency=64, target_pattern=r"self_attn\.(q_proj|v_proj)$"))
    for layer in layers.values():
        torch.nn.init.normal_(layer.coef, std=0.01)
    conditioning = comfy_model.in_loop_conditioning(tiny_sdxl(seed=5), clip, "a photo of (zjw:1.2) dog")

    def gradients() -> torch.Tensor:
        for layer in layers.values():
            layer.coef.grad = None
        context, y = conditioning({"size": torch.tensor([[64, 96], [64, 96]])})
        assert context.shape == (2, 77, 2048) and y.shape == (2, 2816)
        (context.square().mean() + y.square().mean()).backward()
        return torch.cat([layer.coef.grad if layer.coef.grad is not None else torch.zeros(64) for layer in layers.values()])

    ours = gradients()

    def out_of_place(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))

    monkeypatch.setattr(comfy.clip_model.CLIPLayer, "forward", out_of_place)
    reference = gradients()
    assert (reference != 0).sum() >= 0.8 * reference.numel()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype,manual_cast", [(torch.bfloat16, None), (torch.float16, torch.float32)])
def test_half_precision_and_manual_cast_models_train(host, dtype, manual_cast):
    """What GPUs run: a bf16 UNet, and fp16 weights computed in float32 by ComfyUI's manual-cast layers
    (the targeted Linears are cast for training and given back afterwards)."""
    import comfy.model_management as mm

    train = host["nodes"].NODE_CLASS_MAPPINGS["WaveFTTrain"]
    model = tiny_sdxl(seed=6, dtype=dtype, manual_cast=manual_cast)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert before["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"].dtype == dtype
    with torch.inference_mode():
        output = train.execute([model], [tiny_clip()], [tiny_vae()], [torch.rand(1, 32, 32, 3)],
                               **{k: [v] for k, v in {**TRAIN, "name": f"half_{dtype}"}.items()})
    trained, adapter = output.args[0], output.args[1]
    assert all(torch.isfinite(layer.coef).all() for layer in adapter.layers.values())
    assert sum(bool(layer.coef.abs().sum() > 0) for layer in adapter.layers.values()) > len(adapter.layers) // 2
    mm.unload_all_models()
    after = model.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert len(trained.patches) == len(adapter.layers)


def test_cancel_keeps_the_last_step_on_disk(host, progress_calls):
    _, stop_at, _ = progress_calls
    stop_at.append(2)
    executor, _ = run_prompt(_prompt(steps=50, name="cancelled"))
    assert not executor.success
    assert any(m[0] == "execution_interrupted" for m in executor.status_messages)
    saved = host["work"] / "models" / "loras" / "cancelled_step2.safetensors"  # where the stock Load LoRA lists it
    assert saved.is_file() and load_adapter(saved).metadata["ss_steps"] == "2"


def _checkpoints(host, name: str) -> list:
    return sorted((host["work"] / "models" / "waveft" / "checkpoints").glob(f"{name}-*"))


def _trained(executor) -> dict[str, torch.Tensor]:
    saved = executor.history_result["outputs"]["4"]["text"][0]
    return {prefix: layer.coef for prefix, layer in load_adapter(saved).layers.items()}


def test_a_failed_run_requeued_continues_where_it_stopped(host, progress_calls):
    """An error at step 3 of 5 (say, out of memory) keeps a checkpoint; queueing the same run again trains
    steps 4 and 5 only, and ends where an uninterrupted run ends."""
    calls, stop_at, crash = progress_calls
    stop_at.append(3)
    crash.append(True)
    failed, _ = run_prompt(_prompt(steps=5, name="crashy"))
    assert not failed.success and "simulated" in str(failed.status_messages)
    adapter, state = _checkpoints(host, "crashy")
    assert adapter.suffix == ".safetensors" and state.suffix == ".waveft-state"
    assert load_adapter(adapter).metadata["ss_steps"] == "3"
    calls.clear()
    stop_at.clear()
    resumed, _ = run_prompt(_prompt(steps=5, name="crashy"))
    assert resumed.success and calls == [(4, 5), (5, 5)]
    uninterrupted, _ = run_prompt(_prompt(steps=5, name="smooth"))
    expected = _trained(uninterrupted)
    # two uninterrupted runs already differ by ~1e-4 of the largest coefficient here (their losses part in the
    # last bit at step 4: the tiny ComfyUI model is not bitwise deterministic on CPU; WaveFT's layers are),
    # so equality is up to that; a run restarted from scratch or from another step is off by far more
    scale = max(float(coef.abs().max()) for coef in expected.values())
    assert all(float((coef - expected[prefix]).abs().max()) <= 1e-3 * scale for prefix, coef in _trained(resumed).items())
    calls.clear()
    again, _ = run_prompt(_prompt(steps=5, name="crashy", resume=False))  # start over, on purpose
    assert again.success and calls[0] == (1, 5)
    calls.clear()
    longer = adapter.read_bytes()
    shorter, _ = run_prompt(_prompt(steps=2, name="crashy"))  # the checkpoint holds 5 steps, not step 2
    assert shorter.success and calls == [(1, 2), (2, 2)]
    assert adapter.read_bytes() == longer, "a shorter run must not overwrite the longer run's checkpoint"
    (short_adapter,) = [p for p in _checkpoints(host, "crashy") if p.name.endswith("-upto2.safetensors")]
    assert load_adapter(short_adapter).metadata["ss_steps"] == "2"


def test_other_settings_are_another_run(host, progress_calls):
    calls, stop_at, _ = progress_calls
    stop_at.append(2)
    run_prompt(_prompt(steps=4, name="variants"))  # cancelled at step 2, checkpoint kept
    calls.clear()
    stop_at.clear()
    other, _ = run_prompt(_prompt(steps=4, name="variants", learning_rate=2e-2))
    assert other.success and calls[0] == (1, 4)  # not resumed from the other learning rate's checkpoint
    assert len(_checkpoints(host, "variants")) == 4  # two runs, an adapter and a state each


def test_engine_convention_matches_comfyui_sampling(host):
    """The UNet on DDPM inputs predicts what ComfyUI's sampler uses: eps = (x - denoised) / sigma."""
    comfy_model = pack_module("nodes.comfy_model")
    model = tiny_sdxl(seed=2)
    assert comfy_model.schedule(model) == {"prediction_type": "epsilon", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    base = model.model
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    cond = {"context": torch.randn(2, 8, 2048, generator=g), "y": torch.randn(2, 2816, generator=g)}
    timesteps = torch.tensor([40, 700])
    sigma = base.model_sampling.sigmas[timesteps][:, None, None, None]
    abar = 1 / (1 + sigma**2)
    with torch.no_grad():
        ours = comfy_model.make_denoise(base.diffusion_model, torch.float32)(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, timesteps, cond)
        noisy = x0 + sigma * eps  # ComfyUI's EPS parametrisation
        denoised = base.apply_model(noisy, sigma.flatten(), c_crossattn=cond["context"], y=cond["y"])
    assert torch.allclose(ours, (noisy - denoised) / sigma, atol=1e-4)


def test_a_refused_setting_is_named_as_the_widget_on_the_node(host):
    training = pack_module("nodes.training_run")
    opt = {**TRAIN, "precision": "zjw_dog"}
    with pytest.raises(ValueError, match=r"WaveFT Train: precision must be one of .*got 'zjw_dog'") as err:
        training.train_settings(tiny_sdxl(seed=0), opt)
    assert "mixed_precision" not in str(err.value)
