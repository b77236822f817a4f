"""Pure parts of the trainer: settings validation, diffusion maths, buckets, schedules, plot, progress bar."""

from __future__ import annotations

import io
import math

import pytest
import torch
from trainer_toys import one_thread  # noqa: F401  (an autouse fixture)

from trainer import TrainingData, TrainSettings, encode_png, plot_losses, run_key
from trainer import diffusion as diff
from trainer.data import BatchSchedule, batches_per_epoch, epoch_batches, group_by_shape
from trainer.progress import TextProgress, render_bar
from waveft_core import WaveFTConfig

# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be an integer >= 1"),
        ("steps", 2.5, "steps must be an integer"),
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
        ("lr_scheduler", "exp", "lr_scheduler must be one of 'constant', 'linear', 'cosine'"),
        ("mixed_precision", "fp8", "mixed_precision must be one of 'auto', 'bf16', 'fp16', 'no'"),
        ("prediction_type", "sample", "prediction_type must be one of 'epsilon', 'v_prediction'"),
        ("batch_size", 0, "batch_size"),
        ("grad_accum", True, "grad_accum"),
        ("max_grad_norm", 0.0, "max_grad_norm"),
        ("noise_offset", -0.1, "noise_offset"),
        ("min_snr_gamma", 0, "min_snr_gamma"),
        ("timestep_range", (500, 500), "timestep_range must satisfy 0 <= lo < hi <= num_train_timesteps=1000"),
        ("timestep_range", (0, 1001), "timestep_range"),
        ("timestep_range", (0.0, 10), "timestep_range must be two integers"),
        ("beta_end", 0.0001, "beta_end"),
        ("save_every", -1, "save_every"),
        ("seed", -1, "seed"),
        ("waveft", "db1", "waveft must be a WaveFTConfig"),
    ],
)
def test_settings_reject_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainSettings(**{field: value})


def test_settings_paper_defaults_and_round_trip():
    s = TrainSettings()
    assert (s.steps, s.learning_rate, s.weight_decay, s.lr_scheduler) == (500, 1e-4, 1e-4, "constant")
    assert (s.batch_size, s.grad_accum, s.max_grad_norm, s.resolution) == (1, 4, 1.0, 1024)
    assert (s.waveft.n_frequency, s.waveft.scaling, s.waveft.wavelet, s.waveft.seed) == (2592, 25.0, "db1", 777)
    assert (s.beta_start, s.beta_end, s.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert s.precision(torch.device("cpu")) == "no" and s.precision(torch.device("cuda")) == "bf16"
    assert TrainSettings(mixed_precision="fp16").precision(torch.device("cuda")) == "fp16"
    again = TrainSettings(**s.to_dict())
    assert again == s and isinstance(again.waveft, WaveFTConfig)


def test_trajectory_ignores_what_may_change_between_sessions():
    base = TrainSettings(steps=100).trajectory_dict()
    assert TrainSettings(steps=300, save_every=50, output_name="x").trajectory_dict() == base
    assert TrainSettings(steps=100, learning_rate=2e-4).trajectory_dict() != base
    assert TrainSettings(steps=100, mixed_precision="no").trajectory_dict("cpu") == base  # auto == no on CPU
    cosine = TrainSettings(steps=100, lr_scheduler="cosine").trajectory_dict()
    assert TrainSettings(steps=200, lr_scheduler="cosine").trajectory_dict() != cosine


# --- diffusion maths (diffusers' DDPMScheduler is the oracle) ------------------------------------------------


def test_run_key_names_what_the_result_depends_on():
    """Same run, same key (nothing in it is an id or an address); any input of the result changed,
    another key; ``steps`` of a constant schedule and the output name are not part of it."""
    def key(settings: TrainSettings | None = None, scale=1.0, context=1.0, weight=1.0) -> str:
        settings = settings or TrainSettings()
        data = TrainingData(latents=[torch.ones(4, 8, 8) * scale], conds=[{"context": torch.ones(77, 16) * context}])
        weights = [torch.arange(12.0).reshape(3, 4) * weight, torch.ones(5)]
        return run_key(settings, data, weights, torch.device("cpu"), torch.float32)

    base = key()
    assert base == key() and len(base) == 16 and int(base, 16) >= 0
    assert key(TrainSettings(steps=900, output_name="other", save_every=7)) == base
    others = [key(TrainSettings(learning_rate=2e-4)), key(TrainSettings(waveft=WaveFTConfig(n_frequency=100))),
              key(scale=1.5), key(context=1.001), key(weight=1.001), key(TrainSettings(lr_scheduler="cosine"))]
    assert len({base, *others}) == 1 + len(others)


def test_noise_schedule_and_targets_match_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    abar = diff.alphas_cumprod(1000, 0.00085, 0.012)
    torch.testing.assert_close(abar.float(), ref.alphas_cumprod, rtol=1e-6, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    a = abar.float()[t]
    torch.testing.assert_close(diff.add_noise(x0, eps, a), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff.prediction_target(x0, eps, a, "v_prediction"), ref.get_velocity(x0, eps, t))
    assert diff.prediction_target(x0, eps, a, "epsilon") is eps


def test_zero_terminal_snr_schedule_matches_diffusers_and_is_refused_for_epsilon():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=True)  # fmt: skip
    abar = diff.alphas_cumprod(1000, 0.00085, 0.012, zero_terminal_snr=True)
    torch.testing.assert_close(abar.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert abar[-1] == 0 and abar[0] == diff.alphas_cumprod(1000, 0.00085, 0.012)[0]
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(diff.prediction_target(x0, eps, abar.float()[-1:], "v_prediction"), -x0)  # pure noise: v = -x0
    assert torch.isfinite(diff.snr_weights(abar.float(), 5.0, "v_prediction")).all()
    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction_type='v_prediction'"):
        TrainSettings(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero_terminal_snr must be True or False"):
        TrainSettings(zero_terminal_snr="yes", prediction_type="v_prediction")
    # runs saved before the option existed keep resuming: the default leaves the trajectory as it was
    assert "zero_terminal_snr" not in TrainSettings().trajectory_dict()
    assert TrainSettings(zero_terminal_snr=True, prediction_type="v_prediction").trajectory_dict()["zero_terminal_snr"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    abar = torch.tensor([0.999, 0.5, 0.001])
    snr = abar / (1 - abar)
    w = diff.snr_weights(abar, 5.0, prediction_type)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(w, expected)
    assert torch.equal(diff.snr_weights(abar, None, prediction_type), torch.ones(3))


def test_noise_offset_and_timesteps_are_seeded():
    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return diff.sample_timesteps(4, (100, 200), gen), diff.sample_noise((4, 4, 8, 8), 0.1, gen)

    (t1, n1), (t2, n2), (t3, _) = draw(1), draw(1), draw(2)
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and not torch.equal(t1, t3)
    assert int(t1.min()) >= 100 and int(t1.max()) < 200
    plain = diff.sample_noise((4, 4, 8, 8), 0.0, torch.Generator().manual_seed(1))
    assert not torch.equal(plain, diff.sample_noise((4, 4, 8, 8), 0.1, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "scheduler, step, expected",
    [
        ("constant", 0, 0.25), ("constant", 3, 1.0), ("constant", 99, 1.0),
        ("linear", 4, 1.0), ("linear", 54, 0.5), ("linear", 104, 0.0),
        ("cosine", 4, 1.0), ("cosine", 54, 0.5), ("cosine", 104, 0.0),
    ],
)  # fmt: skip
def test_learning_rate_schedule(scheduler, step, expected):
    assert diff.learning_rate(step, 104, 1.0, 4, scheduler) == pytest.approx(expected, abs=1e-12)


# --- data and buckets ---------------------------------------------------------------------------------------


def test_buckets_batch_only_same_shapes_and_cover_each_epoch():
    shapes = [(4, 8, 8), (4, 8, 12), (4, 8, 8), (4, 12, 8), (4, 8, 12), (4, 8, 8), (4, 8, 8)]
    buckets = group_by_shape(shapes)
    assert buckets == {(4, 8, 8): [0, 2, 5, 6], (4, 8, 12): [1, 4], (4, 12, 8): [3]}
    schedule = BatchSchedule(buckets, batch_size=3, seed=5)
    assert schedule.per_epoch == batches_per_epoch(buckets, 3) == 4
    for epoch in range(3):
        batches = [schedule.batch(epoch * 4 + k) for k in range(4)]
        assert sorted(i for b in batches for i in b) == list(range(7))
        assert all(len({shapes[i] for i in b}) == 1 and len(b) <= 3 for b in batches)
    fresh = BatchSchedule(buckets, batch_size=3, seed=5)
    assert [fresh.batch(k) for k in (9, 2, 9)] == [schedule.batch(k) for k in (9, 2, 9)]  # pure in the index
    other = [epoch_batches(buckets, 3, torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({str(o) for o in other}) > 1  # the order really is shuffled


@pytest.mark.parametrize(
    "latents, conds, message",
    [
        ([], {"c": torch.zeros(2)}, "at least one latent"),
        (torch.zeros(4, 8, 8), {"c": torch.zeros(2)}, r"\[N, C, H, W\]"),
        ([torch.zeros(4, 8, 8), torch.zeros(3, 8, 8)], {"c": torch.zeros(2)}, r"latents\[1\]"),
        ([torch.zeros(4, 8, 8, dtype=torch.int64)], {"c": torch.zeros(2)}, r"latents\[0\]: expected a floating"),
        ([torch.full((4, 8, 8), float("nan"))], {"c": torch.zeros(2)}, "NaN"),
        ([torch.zeros(4, 8, 8)] * 2, [{"c": torch.zeros(2)}], "2 latents but 1 conditioning"),
        ([torch.zeros(4, 8, 8)] * 2, [{"c": torch.zeros(2)}, {"d": torch.zeros(2)}], r"conds\[1\] has keys"),
        ([torch.zeros(4, 8, 8)] * 2, [{"c": torch.zeros(2)}, {"c": torch.zeros(3)}], r"conds\[1\]\['c'\] has shape"),
        ([torch.zeros(4, 8, 8)], {"c": 3.0}, "must be a tensor"),
    ],
)
def test_training_data_validation(latents, conds, message):
    with pytest.raises(ValueError, match=message):
        TrainingData(latents, conds)


def test_collate_stacks_and_casts():
    data = TrainingData(torch.randn(3, 4, 8, 8), {"c": torch.ones(5), "ids": torch.arange(6)}, num_images=1)
    latents, cond = data.collate([2, 0], torch.device("cpu"), torch.bfloat16)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    assert cond["c"].shape == (2, 5) and cond["c"].dtype == torch.bfloat16 and cond["ids"].dtype == torch.int64
    assert torch.equal(latents[0], data.latents[2]) and data.num_images == 1 and len(data) == 3


# --- plot and progress bar ----------------------------------------------------------------------------------


def test_plot_losses_is_an_rgb_image():
    losses = [1.0 / (1 + 0.05 * k) + 0.05 * math.sin(k) for k in range(200)] + [float("nan")]
    image = plot_losses(losses, width=320, height=160)
    assert image.shape == (160, 320, 3) and image.dtype == torch.uint8
    colours = {tuple(p) for p in image.reshape(-1, 3).tolist()}
    assert {(255, 255, 255), (20, 70, 170), (160, 190, 235)} <= colours
    assert plot_losses([]).shape == (256, 512, 3) and plot_losses([0.5]).shape == (256, 512, 3)
    with pytest.raises(ValueError, match="smoothing"):
        plot_losses(losses, smoothing=1.0)


def test_encode_png_round_trips_pixels():
    from PIL import Image

    image = plot_losses([3.0, 2.0, 1.5, 1.2], width=160, height=96, title="zjw dog")
    png = encode_png(image)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    assert decoded.mode == "RGB" and decoded.size == (160, 96)
    assert torch.equal(torch.frombuffer(bytearray(decoded.tobytes()), dtype=torch.uint8).reshape(96, 160, 3), image)


def test_plot_is_labelled_with_axes_and_title():
    """Text is drawn (axis names, the run's name, tick values): the labelled plot differs from an unlabelled
    one only where text is, and dark text pixels exist above the plot area."""
    with_title = plot_losses([2.0, 1.0, 0.5], title="my run")
    without = plot_losses([2.0, 1.0, 0.5])
    changed = (with_title != without).any(dim=2)
    rows = changed.nonzero()[:, 0]
    assert rows.numel() > 0 and int(rows.max()) < 28  # the title lives in the top margin
    assert (without[240:, 200:300] != 255).any()  # "step" under the x axis


def test_text_progress_bar():
    assert render_bar(5, 10, 0.5, 2.0, 2.5, width=10).startswith("[=====>    ]  5/10  loss 0.5000  2.00 it/s")
    stream = io.StringIO()
    bar = TextProgress(stream, width=10, min_interval=0.0)
    for step in range(1, 4):
        bar(step, 3, 1.0 / step)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "3/3" in text


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")
def test_grad_scaler_on_torch_without_torch_amp_gradscaler(monkeypatch):
    """torch < 2.3 (A1111 1.10 ships 2.1) has only torch.cuda.amp.GradScaler: no crash, disabled on CPU."""
    import torch

    from trainer.engine import _grad_scaler

    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)  # absent on a real torch 2.1
    scaler = _grad_scaler(torch.device("cpu"), enabled=True)
    assert not scaler.is_enabled()


def test_block_checkpointing_recomputes_ldm_blocks_with_the_same_gradients():
    """The ldm/sgm UNet layout both hosts run: blocks recomputed in backward, same gradients, undone exactly."""
    from trainer import block_checkpointing

    torch.manual_seed(0)
    unet = torch.nn.Module()
    unet.input_blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)])
    unet.middle_block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
    unet.output_blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6)])
    calls = []
    unet.middle_block[1].register_forward_pre_hook(lambda *_: calls.append(1))  # inside the block: runs on recompute

    def loss() -> torch.Tensor:
        h = torch.ones(2, 6)
        for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            h = block(h)
        return h.square().sum()

    loss().backward()
    plain = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    calls.clear()
    hook = block_checkpointing(unet)
    hook(True)
    loss().backward()
    assert calls == [1, 1], "the middle block must run again in the backward pass"
    assert all(torch.allclose(p.grad, g) for p, g in zip(unet.parameters(), plain, strict=True))
    hook(False)
    assert all("forward" not in block.__dict__ for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks])


def test_plot_draws_with_a_bitmap_font_as_old_pillow_has(monkeypatch):
    """A1111 1.10 ships Pillow 9.5, whose default font is a bitmap font (no text anchors)."""
    from PIL import ImageFont

    import trainer.plot as plot

    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow has no separate bitmap default font to test with")
    monkeypatch.setattr(plot, "_font", lambda size: ImageFont.load_default_imagefont())
    image = plot.plot_losses([2.0, 1.0, 0.5], title="old pillow")
    assert image.shape == (256, 512, 3) and (image[:28] != 255).any()


def test_both_hosts_training_uis_start_from_the_same_defaults():
    """One source: the engine's and the method's defaults (2592 / db1 / 25 / 777 / 500 / 1e-4 / 1024)."""
    from trainer import UI_DEFAULTS
    from waveft_core import DEFAULT_SCALING, DEFAULT_WAVELET, WaveFTConfig

    assert UI_DEFAULTS["budget"] == WaveFTConfig().n_frequency == 2592
    assert (UI_DEFAULTS["wavelet"], UI_DEFAULTS["scaling"]) == (DEFAULT_WAVELET, DEFAULT_SCALING) == ("db1", 25.0)
    settings = TrainSettings()
    assert (UI_DEFAULTS["steps"], UI_DEFAULTS["learning_rate"], UI_DEFAULTS["seed"], UI_DEFAULTS["resolution"]) == (
        settings.steps, settings.learning_rate, settings.seed, settings.resolution)
