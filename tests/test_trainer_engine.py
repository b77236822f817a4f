"""The training loop on a toy denoiser: learning, resume, cancel, NaN, restore, budgets, file, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_toys import (  # noqa: F401  (one_thread: an autouse fixture)
    ToyDenoiser,
    needs_cpu_fp16,
    one_thread,
    toy_data,
    toy_denoise,
    toy_prefix,
    toy_settings,
)

from trainer import NonFiniteLossError, TrainingStopped, saved_steps, state_path, train_waveft
from waveft_core import WaveFTConfig, load_adapter, waveft_layers


def train(settings=None, data=None, model=None, **kwargs):
    model = model if model is not None else ToyDenoiser()
    result = train_waveft(
        model, toy_denoise(model), data or toy_data(), settings or toy_settings(), name_to_prefix=toy_prefix, **kwargs
    )
    return model, result


def coefs(result):
    return {prefix: layer.coef for prefix, layer in result.layers.items()}


def assert_same_coefs(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_restored(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"] and after["flags"] == before["flags"] and after["modes"] == before["modes"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert all(p.grad is None for p in model.parameters())


def test_loss_falls():
    _, result = train(toy_settings(steps=60))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert result.steps_done == 60 and not result.stopped and result.saved_path is None


def test_same_seed_same_run_and_global_rng_untouched():
    state = torch.get_rng_state()
    _, a = train()
    assert torch.equal(torch.get_rng_state(), state)
    _, b = train()
    _, c = train(toy_settings(seed=1))
    assert a.losses == b.losses and a.losses != c.losses
    assert_same_coefs(coefs(a), coefs(b))


@pytest.mark.parametrize("precision", ["no", pytest.param("fp16", marks=needs_cpu_fp16)])
def test_resume_after_stop_equals_uninterrupted(tmp_path, precision):
    settings = toy_settings(steps=10, save_every=4, mixed_precision=precision)
    _, full = train(settings)
    out = tmp_path / "run.safetensors"
    calls = iter(range(100))
    _, first = train(settings, output_path=out, should_stop=lambda: next(calls) == 6)
    assert first.stopped and first.steps_done == 6 and state_path(out).exists()
    _, rest = train(settings, output_path=out)
    assert rest.steps_done == 10 and not rest.stopped
    assert rest.losses == full.losses
    assert_same_coefs(coefs(rest), coefs(full))
    assert_same_coefs({k: v.coef for k, v in load_adapter(out).layers.items()}, coefs(full))


def test_resume_after_crash_and_extension(tmp_path):
    out = tmp_path / "run.safetensors"

    def crash(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(toy_settings(steps=8), output_path=out, progress=crash)
    assert load_adapter(out).metadata["ss_steps"] == "5"
    _, longer = train(toy_settings(steps=12), output_path=out)  # constant lr: steps may grow
    _, full = train(toy_settings(steps=12))
    assert longer.losses == full.losses


def test_resume_refuses_a_run_longer_than_asked(tmp_path):
    """A state of 6 steps cannot give a 4-step adapter (it holds no earlier steps): an error, not 6 steps."""
    out = tmp_path / "run.safetensors"
    train(toy_settings(steps=6), output_path=out)
    assert saved_steps(state_path(out)) == 6  # from the header, as a host checks before resuming
    (tmp_path / "junk.waveft-state").write_bytes(b"\x00" * 40)
    assert saved_steps(tmp_path / "junk.waveft-state") is None and saved_steps(tmp_path / "none") is None
    with pytest.raises(ValueError, match="holds 6 trained steps, more than the 4 asked for"):
        train(toy_settings(steps=4), output_path=out)
    _, fresh = train(toy_settings(steps=4), output_path=out, resume=False)
    assert fresh.steps_done == 4 and load_adapter(out).metadata["ss_steps"] == "4"


def test_resume_refuses_other_settings_and_can_start_over(tmp_path):
    out = tmp_path / "run.safetensors"
    train(toy_settings(steps=3), output_path=out)
    with pytest.raises(ValueError, match=r"settings\.learning_rate.*resume=False"):
        train(toy_settings(steps=3, learning_rate=1e-3), output_path=out)
    with pytest.raises(ValueError, match=r"data\.latent_sum"):
        train(toy_settings(steps=3), data=toy_data(seed=1), output_path=out)
    _, fresh = train(toy_settings(steps=3, learning_rate=1e-3), output_path=out, resume=False)
    assert fresh.steps_done == 3 and len(fresh.losses) == 3


@pytest.mark.parametrize("how", ["should_stop", "raise_in_progress"])
def test_cancel_leaves_the_last_completed_step(tmp_path, how):
    out = tmp_path / "stop.safetensors"
    seen = []

    def progress(step, total, loss):
        seen.append(step)
        if how == "raise_in_progress" and step == 3:
            raise TrainingStopped

    model = ToyDenoiser()
    before = snapshot(model)
    _, result = train(toy_settings(steps=8), model=model, output_path=out, progress=progress,
                      should_stop=lambda: how == "should_stop" and len(seen) == 3)  # fmt: skip
    assert result.stopped and result.steps_done == 3 and seen == [1, 2, 3] and result.saved_path == out
    saved = load_adapter(out)
    assert saved.metadata["ss_steps"] == "3"
    assert_same_coefs({k: v.coef for k, v in saved.layers.items()}, coefs(result))
    _, three = train(toy_settings(steps=3))
    assert_same_coefs(coefs(result), coefs(three))
    assert_restored(model, before)


def test_nan_loss_raises_and_keeps_the_last_good_adapter(tmp_path):
    out = tmp_path / "nan.safetensors"
    model = ToyDenoiser()
    before = snapshot(model)
    calls = {"n": 0}
    inner = toy_denoise(model)

    def denoise(x, t, cond):
        calls["n"] += 1
        prediction = inner(x, t, cond)
        return prediction * float("nan") if calls["n"] > 8 else prediction  # step 5's first micro-batch

    with pytest.raises(NonFiniteLossError, match="training step 5: the loss is nan") as info:
        train_waveft(model, denoise, toy_data(), toy_settings(), name_to_prefix=toy_prefix, output_path=out)
    assert info.value.step == 5 and info.value.saved_path == out and "step 4 is kept" in str(info.value)
    saved = load_adapter(out)
    assert saved.metadata["ss_steps"] == "4"
    _, four = train(toy_settings(steps=4))
    assert_same_coefs({k: v.coef for k, v in saved.layers.items()}, coefs(four))
    assert_restored(model, before)


def test_model_restored_exactly_after_training_and_after_an_error():
    model = ToyDenoiser()
    model.conv_in.requires_grad_(False)
    model.blocks[0].eval()
    before = snapshot(model)
    train(model=model)
    assert_restored(model, before)

    def broken(x, t, cond):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_waveft(model, broken, toy_data(), toy_settings(), name_to_prefix=toy_prefix)
    assert_restored(model, before)


def test_keep_attached_and_refuse_double_attach():
    model, result = train(keep_attached=True)
    layers = waveft_layers(model)
    assert len(layers) == len(result.layers) == 8
    prefixed = {toy_prefix(name): layer for name, layer in layers.items()}
    assert_same_coefs({k: v.coef.detach() for k, v in prefixed.items()}, coefs(result))
    with pytest.raises(ValueError, match="already has WaveFT layers"):
        train(model=model)


def test_budgets_total_mode_is_exact_and_overrides_apply(tmp_path):
    out = tmp_path / "budget.safetensors"
    _, total = train(toy_settings(steps=2, waveft=WaveFTConfig(total_budget=1001)), output_path=out)
    assert sum(layer.num_params for layer in total.layers.values()) == 1001
    assert load_adapter(out).metadata["waveft_total_budget"] == "1001"
    override = WaveFTConfig(n_frequency=16, n_frequency_pattern={r"attn2\.to_k$": 40})
    _, per_layer = train(toy_settings(steps=2, waveft=override))
    sizes = {prefix: layer.num_params for prefix, layer in per_layer.layers.items()}
    assert sizes.pop("lora_unet_blocks_0_attn2_to_k") == 40 and set(sizes.values()) == {16}


def test_target_pattern_selects_feed_forward_too():
    pattern = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|ff\.(0|2)$"
    _, result = train(toy_settings(steps=2, waveft=WaveFTConfig(n_frequency=16, target_pattern=pattern)))
    assert {"lora_unet_blocks_0_ff_0", "lora_unet_blocks_0_ff_2"} <= set(result.layers) and len(result.layers) == 10


def test_text_encoder_layers_train_when_it_runs_in_the_loop(tmp_path):
    """The engine adapts whatever the pattern selects in the module it is given: a host that passes the
    denoiser together with a text encoder, and computes the conditioning from token ids inside ``denoise``,
    trains the encoder's layers too (the ComfyUI node does this for CLIP)."""
    from trainer_toys import CONTEXT, TOKENS

    from waveft_core.names import kohya_name

    denoiser = ToyDenoiser()
    encoder = torch.nn.Sequential(torch.nn.Embedding(50, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, CONTEXT))
    parts = torch.nn.ModuleDict({"unet": denoiser, "te1": encoder})
    data = toy_data()
    data.conds = [{"ids": torch.arange(TOKENS) % 50} for _ in data.latents]  # token ids, no cached embedding

    def denoise(noisy, timesteps, cond):
        return denoiser(noisy, timesteps, encoder(cond["ids"]).to(noisy.dtype))

    def prefix(name: str) -> str:
        part, _, rest = name.partition(".")
        return kohya_name(part, rest)

    pattern = r"^unet\..*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|^te1\.(1|2)$"
    settings = toy_settings(steps=3, waveft=WaveFTConfig(n_frequency=16, target_pattern=pattern))
    result = train_waveft(parts, denoise, data, settings, name_to_prefix=prefix, output_path=tmp_path / "te.safetensors")
    assert {"lora_te1_1", "lora_te1_2"} <= set(result.layers) and len(result.layers) == 10
    assert all(result.layers[p].coef.abs().sum() > 0 for p in ("lora_te1_1", "lora_te1_2"))
    assert not waveft_layers(parts)  # detached again, the encoder as it was


def test_saved_file_is_format_v1_with_training_metadata(tmp_path):
    out = tmp_path / "zjw.safetensors"
    settings = toy_settings(steps=4, save_every=2, output_name="zjw-toy")
    _, result = train(settings, output_path=out, metadata={"ss_training_comment": "custom"})
    saved = load_adapter(out)
    meta = saved.metadata
    assert meta["waveft_version"] == "1" and meta["ss_network_module"] == "waveft"
    assert meta["ss_output_name"] == "zjw-toy" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_steps"], meta["waveft_train_lr"], meta["waveft_wavelet"]) == ("4", "0.01", "db1")
    assert meta["waveft_total_budget"] == str(8 * 16) and meta["ss_num_train_images"] == "6"
    assert meta["waveft_base_model"] == "toy" and meta["waveft_instance_prompt"] == "a photo of zjw toy"
    assert meta["ss_training_comment"] == "custom"
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"a photo of zjw toy": 6}}
    assert set(saved.layers) == {toy_prefix(n) for n, m in ToyDenoiser().named_modules() if "attn" in n and
                                 isinstance(m, torch.nn.Linear)}  # fmt: skip
    assert result.metadata["ss_steps"] == "4" and result.saved_path == out
    assert not list(tmp_path.glob("*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "zjw.safetensors", "zjw.waveft-state"
    ]  # fmt: skip


def test_batches_never_mix_bucket_shapes():
    shapes_seen = []
    model = ToyDenoiser()
    inner = toy_denoise(model)

    def denoise(x, t, cond):
        shapes_seen.append(tuple(x.shape))
        return inner(x, t, cond)

    data = toy_data(n=7, sizes=((8, 8), (8, 12), (12, 8)))
    train_waveft(model, denoise, data, toy_settings(steps=4, batch_size=3), name_to_prefix=toy_prefix)
    assert {s[2:] for s in shapes_seen} == {(8, 8), (8, 12), (12, 8)}
    assert all(s[0] <= 3 for s in shapes_seen)


@pytest.mark.parametrize(
    "overrides",
    [
        {"mixed_precision": "bf16"},
        pytest.param({"mixed_precision": "fp16"}, marks=needs_cpu_fp16),
        {"prediction_type": "v_prediction", "min_snr_gamma": 5.0},
        {"noise_offset": 0.05, "timestep_range": (200, 800), "lr_scheduler": "cosine", "warmup_steps": 2},
        {"max_grad_norm": None, "weight_decay": 0.0},
    ],
)
def test_options_train_finitely_and_change_the_run(overrides):
    _, plain = train(toy_settings(steps=4))
    _, result = train(toy_settings(steps=4, **overrides))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses != plain.losses or overrides.get("max_grad_norm", 1.0) is None


def test_gradient_checkpointing_hook_is_called_and_undone():
    calls = []
    train(toy_settings(steps=1, gradient_checkpointing=True), set_gradient_checkpointing=calls.append)
    assert calls == [True, False]
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        train(toy_settings(steps=1, gradient_checkpointing=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"settings": toy_settings(waveft=WaveFTConfig(target_pattern="nothing$"))}, "no layer matches"),
        ({"name_to_prefix": lambda name: "lora_unet_same"}, "maps both"),
        ({"name_to_prefix": lambda name: name}, "expected a name like 'lora_unet_...'"),
        ({"denoise": lambda x, t, cond: x[:, :2]}, r"denoise returned shape \(2, 2, 8, 8\), expected \(2, 4, 8, 8\)"),
        ({"data": toy_data(), "settings": toy_settings(gradient_checkpointing=True)}, "enable_gradient_checkpointing"),
    ],
)
def test_bad_inputs_fail_early_and_leave_the_model_untouched(kwargs, message):
    model = ToyDenoiser()
    before = snapshot(model)
    arguments = {
        "denoise": toy_denoise(model),
        "data": toy_data(),
        "settings": toy_settings(),
        "name_to_prefix": toy_prefix,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        train_waveft(model, arguments.pop("denoise"), arguments.pop("data"), arguments.pop("settings"), **arguments)
    assert_restored(model, before)


def test_stop_before_the_first_step_writes_nothing(tmp_path):
    out = tmp_path / "none.safetensors"
    _, result = train(output_path=out, should_stop=lambda: True)
    assert result.stopped and result.steps_done == 0 and result.saved_path is None and not out.exists()


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    out = tmp_path / "run.safetensors"
    state_path(out).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="run.waveft-state: not a readable WaveFT training state"):
        train(output_path=out)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_trains_when_the_host_calls_without_grad(mode):
    model = ToyDenoiser()
    with mode():
        data = toy_data()  # inference-mode latents and conditioning are copied into ordinary tensors
        _, result = train(toy_settings(steps=2), data=data, model=model)
    _, plain = train(toy_settings(steps=2))
    assert result.losses == plain.losses


def test_inference_tensor_parameters_are_a_clear_error():
    with torch.inference_mode():
        model = ToyDenoiser()
    with pytest.raises(ValueError, match="parameter 'conv_in.weight' is an inference tensor"):
        train(model=model)


@pytest.mark.parametrize("input_dtype", [None, torch.float64])
def test_fp8_stored_model_gets_float_inputs(input_dtype):
    """A model whose first parameter is fp8 (host-side storage, upcast per layer) must not get fp8 latents;
    an explicit ``input_dtype`` (a ComfyUI model's compute dtype) wins."""
    model = ToyDenoiser().double() if input_dtype == torch.float64 else ToyDenoiser()
    model.register_parameter("scale_fp8", torch.nn.Parameter(torch.ones(2).to(torch.float8_e4m3fn), requires_grad=False))
    model._parameters = {"scale_fp8": model._parameters.pop("scale_fp8"), **model._parameters}  # the first one
    seen = []
    denoise = toy_denoise(model)

    def recording(noisy, timesteps, cond):
        seen.append((noisy.dtype, cond["context"].dtype))
        return denoise(noisy, timesteps, cond)

    result = train_waveft(
        model, recording, toy_data(), toy_settings(steps=2), name_to_prefix=toy_prefix, input_dtype=input_dtype
    )
    expected = input_dtype or torch.float32
    assert seen and set(seen) == {(expected, expected)} and all(math.isfinite(x) for x in result.losses)


def test_mixed_precision_this_torch_cannot_autocast_is_refused_before_training(monkeypatch):
    """torch 2.1 (A1111 1.10) cannot autocast fp16 on CPU, nor bf16 on pre-Ampere GPUs: a clear error, model
    untouched, instead of a failure inside the first step."""
    model = ToyDenoiser()
    before = snapshot(model)

    class Refusing:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            raise RuntimeError("Currently, AutocastCPU only support Bfloat16 as the autocast_cpu_dtype")

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(torch, "autocast", Refusing)
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' is not available on cpu .* choose bf16 or 'no'"):
        train(toy_settings(steps=2, mixed_precision="fp16"), model=model)
    assert_restored(model, before)


@pytest.mark.parametrize("native_bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_is_fp16_on_gpus_without_native_bf16(monkeypatch, native_bf16, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = toy_settings(mixed_precision="auto")
    assert settings.precision(torch.device("cuda")) == expected and calls == [False]
    assert settings.precision(torch.device("cpu")) == "no"
    # a half-precision model keeps its own type whatever the card prefers
    assert settings.precision(torch.device("cuda"), torch.float16) == "fp16"
    assert settings.precision(torch.device("cuda"), torch.bfloat16) == "bf16"
    assert settings.precision(torch.device("cuda"), torch.float32) == expected
    assert settings.precision(torch.device("cpu"), torch.float16) == "no"


@pytest.mark.parametrize("scaling_works,expected", [(True, "fp16"), (False, "no")])
def test_auto_precision_on_other_accelerators(monkeypatch, scaling_works, expected):
    """Apple's MPS, Intel's XPU: an fp16 model gets fp16 autocast with loss scaling where this torch does both
    right there, else no autocast; bf16 and float32 models need neither."""
    import trainer.settings as settings_module

    monkeypatch.setattr(settings_module, "scaled_fp16_works", lambda device: scaling_works)
    settings = toy_settings(mixed_precision="auto")
    assert settings.precision(torch.device("mps"), torch.float16) == expected
    assert settings.precision(torch.device("mps"), torch.bfloat16) == "no"
    assert settings.precision(torch.device("xpu"), torch.float32) == "no"


@needs_cpu_fp16
def test_scaled_fp16_probe_checks_the_update_itself(monkeypatch):
    import trainer.settings as settings_module

    probe = settings_module.scaled_fp16_works.__wrapped__
    assert probe(torch.device("cpu"))  # this torch autocasts fp16 and loss-scales on the CPU
    with monkeypatch.context() as patch:  # a step that silently does the wrong thing: caught by its result
        patch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
        assert not probe(torch.device("cpu"))

    def broken(*args, **kwargs):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", broken)
    assert not probe(torch.device("cpu"))


@pytest.mark.parametrize("tamper", ["nan", "negative", "steps"])
def test_a_tampered_resume_state_is_refused_and_the_good_checkpoint_kept(tmp_path, tamper):
    """Moments are checked before they are used: a NaN or negative second moment would make the next step's
    coefficients NaN, which the next checkpoint would then write over the last good adapter."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def crash_after_step_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(toy_settings(steps=8), output_path=out, progress=crash_after_step_3)
    path = state_path(out)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("exp_avg_sq/"))
    if tamper == "nan":
        tensors[key][0] = float("nan")
    elif tamper == "negative":
        tensors[key][0] = -1.0
    else:
        info = json.loads(metadata["waveft_train_state"])
        info["adam_steps"] = {name: -3 for name in info["adam_steps"]}
        metadata["waveft_train_state"] = json.dumps(info)
    save_file(tensors, str(path), metadata=metadata)
    good = out.read_bytes()
    with pytest.raises(ValueError, match="not finite or negative|negative or fractional step counts"):
        train(toy_settings(steps=8), output_path=out)
    assert out.read_bytes() == good and load_adapter(out).metadata["ss_steps"] == "3"


def test_a_diverged_update_is_never_saved_over_the_last_good_adapter(tmp_path):
    """An absurd learning rate: the update outgrows what a file may hold (and what an fp16 model survives);
    the run stops with a clear error and the last good checkpoint stays."""
    import waveft_core

    out = tmp_path / "run.safetensors"
    settings = toy_settings(steps=6, save_every=2)
    seen = []

    def blow_up(step, total, loss):  # after step 3, make the coefficients huge, as a runaway lr would
        seen.append(step)
        if step == 3:
            for layer in waveft_layers(model).values():
                with torch.no_grad():
                    layer.coef.fill_(2 * waveft_core.MAX_UPDATE / layer.scaling)

    model = ToyDenoiser()
    with pytest.raises(NonFiniteLossError, match="training step 4: the update") as info:
        train(settings, model=model, output_path=out, progress=blow_up)
    assert info.value.saved_path == out and "the adapter of step 2 is kept" in str(info.value)
    assert load_adapter(out).metadata["ss_steps"] == "2"
