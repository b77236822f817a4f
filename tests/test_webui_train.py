"""The A1111 training tab's logic with stand-ins (no A1111, no gradio): images, caching, a full run, the job.

The model is a tiny sgm-shaped UNet (ldm module paths, ``forward(x, timesteps, context, y)``) behind an
``OpenAIWrapper``-like ``forward(x, t, c)``; the VAE and the SDXL conditioner are small deterministic fakes.
"""

from __future__ import annotations

import math
import os
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from packs import load_pack
from PIL import Image
from torch import nn

from waveft_core import load_adapter

PACK = "waveft_pack_train_test"
pack = load_pack(PACK)
train_data = __import__(f"{PACK}.webui_ext.train_data", fromlist=["x"])
train_a1111 = __import__(f"{PACK}.webui_ext.train_a1111", fromlist=["x"])
train_tab = __import__(f"{PACK}.webui_ext.train_tab", fromlist=["x"])
DIM, CTX, VEC, TOKENS = 16, 12, 10, 5


# ----------------------------------------------------------------------------- stand-ins


class TinyAttention(nn.Module):
    def __init__(self, context_dim: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(DIM, DIM), nn.Linear(context_dim, DIM), nn.Linear(context_dim, DIM)
        self.to_out = nn.ModuleList([nn.Linear(DIM, DIM)])

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](F.scaled_dot_product_attention(q, k, v))


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1, self.attn2 = TinyAttention(DIM), TinyAttention(CTX)

    def forward(self, x, context):
        x = x + self.attn1(x, x)
        return x + self.attn2(x, context)


class TinyUNet(nn.Module):
    """sgm UNetModel's call signature and module paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``)."""

    def __init__(self) -> None:
        super().__init__()
        spatial = nn.Module()
        spatial.transformer_blocks = nn.ModuleList([TinyBlock()])
        self.input_blocks = nn.ModuleList([nn.ModuleList() for _ in range(4)] + [nn.ModuleList([nn.Identity(), spatial])])
        self.proj_in, self.proj_out = nn.Conv2d(4, DIM, 1), nn.Conv2d(DIM, 4, 1)
        self.label_emb, self.time_embed = nn.Linear(VEC, DIM), nn.Linear(1, DIM)

    def forward(self, x, timesteps=None, context=None, y=None):
        b, _, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)
        tokens = tokens + (self.label_emb(y) + self.time_embed(timesteps.float()[:, None] / 1000))[:, None]
        tokens = self.input_blocks[4][1].transformer_blocks[0](tokens, context)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, DIM, h, w))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = TinyUNet()

    def forward(self, x, t, c):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class Conditioning(list):
    """prompt_parser.SdConditioning's shape: a list of prompts plus width/height."""

    def __init__(self, prompts, width=None, height=None) -> None:
        super().__init__(prompts)
        self.width, self.height = width, height


def fake_conditioner(calls: list, context: int = CTX, vector: int = VEC):
    def get_learned_conditioning(batch):
        calls.append((list(batch), batch.width, batch.height))
        gen = torch.Generator().manual_seed(zlib.crc32(f"{batch[0]}{batch.width}x{batch.height}".encode()))
        return {"crossattn": torch.randn(1, TOKENS, context, generator=gen), "vector": torch.randn(1, vector, generator=gen)}

    return get_learned_conditioning


def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    assert pixels.min() >= 0 and pixels.max() <= 1  # A1111's helper takes [0, 1]
    rgb = F.avg_pool2d(pixels * 2 - 1, 8)
    return torch.cat([rgb, rgb.mean(1, keepdim=True)], dim=1)


class FakeState:
    def __init__(self) -> None:
        self.interrupted, self.textinfo, self.job_no, self.job_count, self.events = False, None, 0, 0, []

    def begin(self, job=""):
        self.events.append(("begin", job))

    def end(self):
        self.events.append(("end",))


def write_images(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(index)
        data = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        path = folder / f"img{index}.png"
        Image.fromarray(data).save(path)
        paths.append(path)
    return paths


def pieces(tmp_path: Path, **overrides) -> SimpleNamespace:
    calls: list = []
    sd_model = SimpleNamespace(model=Wrapper(), is_sdxl=True)
    host = train_a1111.HostPieces(
        sd_model=sd_model, state=FakeState(), lora_dir=tmp_path / "Lora", encode_image=fake_vae,
        encode_prompt=train_data.sdxl_prompt_encoder(fake_conditioner(calls), Conditioning),
        release_networks=lambda: calls.append("release"), refresh_networks=lambda: calls.append("refresh"),
        model_name="tiny_sdxl",
    )
    for key, value in overrides.items():
        setattr(host, key, value)
    return SimpleNamespace(host=host, calls=calls)


def request(paths, **overrides) -> object:
    values = dict(name="my adapter", prompt="a photo of zjw dog", image_paths=paths, budget=6, steps=3,
                  learning_rate=1e-2, resolution=64, seed=3)
    values.update(overrides)
    return train_a1111.TrainRequest(**values)


# ----------------------------------------------------------------------------- images and caching


@pytest.mark.parametrize(("size", "resolution", "expected"), [
    ((1024, 1024), 1024, (1024, 1024)), ((1920, 1080), 1024, (1344, 768)), ((500, 2000), 512, (256, 1024)),
    ((10, 10), 64, (64, 64)),
])
def test_fit_size_keeps_area_aspect_and_multiples_of_64(size, resolution, expected):
    assert train_data.fit_size(*size, resolution) == expected


def test_list_and_load_images(tmp_path):
    paths = write_images(tmp_path / "imgs", [(100, 80), (80, 100)])
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    assert train_data.list_images(tmp_path / "imgs") == paths
    image = train_data.load_image(paths[0], 64)  # below 256 px buckets go in 8 px steps, as in ComfyUI's node
    assert image.size == (72, 56) and image.mode == "RGB"
    tensor = train_data.image_to_tensor(image)
    assert tensor.shape == (1, 3, 56, 72) and 0 <= tensor.min() and tensor.max() <= 1
    with pytest.raises(ValueError, match="no images"):
        train_data.list_images(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        train_data.list_images(tmp_path / "missing")
    (tmp_path / "half.png").write_bytes(b"")  # what gradio 3.41 once handed over before the upload was written
    with pytest.raises(ValueError, match=r"half.png is empty \(an upload still in progress\?\)"):
        train_data.load_image(tmp_path / "half.png", 64)


def test_conditions_are_encoded_once_per_bucket(tmp_path):
    calls: list = []
    encode = train_data.sdxl_prompt_encoder(fake_conditioner(calls), Conditioning)
    images = [Image.new("RGB", size) for size in ((64, 64), (128, 64), (64, 64))]
    conds = train_data.encode_conditions(images, "zjw dog", encode)
    assert calls == [(["zjw dog"], 64, 64), (["zjw dog"], 128, 64)]  # SDXL size conditioning per bucket
    assert conds[0] is conds[2] and conds[0]["crossattn"].shape == (TOKENS, CTX) and conds[0]["vector"].shape == (VEC,)


def test_non_sdxl_conditioning_is_a_clear_error():
    encode = train_data.sdxl_prompt_encoder(lambda batch: torch.zeros(1, 77, 768), Conditioning)
    with pytest.raises(ValueError, match="not SDXL"):
        encode("x", 64, 64)


# ----------------------------------------------------------------------------- a whole run


def test_run_trains_saves_previews_and_restores_the_model(tmp_path):
    env = pieces(tmp_path)
    paths = write_images(tmp_path / "imgs", [(64, 64), (96, 64), (64, 64)])
    unet = env.host.sd_model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = train_a1111.run_training(request(paths), env.host)
    assert result.steps_done == 3 and not result.stopped and len(result.losses) == 3
    assert train_a1111.settings_for(request(paths), "m").save_every == train_a1111.UI_DEFAULTS["save_every"] > 0
    saved = load_adapter(tmp_path / "Lora" / "my adapter.safetensors")
    assert set(saved.layers) == {f"lora_unet_input_blocks_4_1_transformer_blocks_0_{a}_{p}"
                                 for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")}
    assert all(layer.num_params == 6 for layer in saved.layers.values())
    assert any(layer.coef.abs().sum() > 0 for layer in saved.layers.values())
    assert saved.metadata["ss_base_model_version"].startswith("sdxl_") and saved.metadata["ss_output_name"] == "my adapter"
    assert (tmp_path / "Lora" / "my adapter.preview.png").is_file()
    assert env.calls.index("release") < env.calls.index("refresh")  # LoRAs restored before training
    assert env.host.state.job_no == 3 and "step 3/3" in env.host.state.textinfo
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is not pack.waveft_core.WaveFTLinear for m in unet.modules())


def _sgm_checkout() -> Path | None:
    root = os.environ.get("WEBUI_ROOT")
    path = Path(root) / "repositories" / "generative-models" if root else None
    return path if path is not None and (path / "sgm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file() else None


@pytest.mark.skipif(_sgm_checkout() is None, reason="set WEBUI_ROOT to an A1111 install that has repositories/generative-models "
                    "(A1111 clones it at first launch) to train through the real SDXL UNet code")
def test_run_trains_through_the_real_sgm_unet(tmp_path, monkeypatch):
    """The tab's whole run on Stability's own SDXL UNet class (sgm ``UNetModel``, SDXL's block layout cut to
    11 transformer blocks, random weights): all 88 attention projections train, the model comes back exact."""
    import sys
    import types

    pytest.importorskip("einops", reason="sgm's UNet needs einops (A1111 installs it)")
    sgm_root = _sgm_checkout() / "sgm"
    for name, path in (("sgm", sgm_root), ("sgm.modules", sgm_root / "modules")):  # their __init__ imports
        package = types.ModuleType(name)  # open_clip and lightning, which the UNet does not need
        package.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, package)
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=32,
                     attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=16,
                     use_linear_in_transformer=True, transformer_depth=[0, 1, 1], context_dim=2048).requires_grad_(False)
    with torch.no_grad():  # sgm zero-initialises its output projections, which would stop every gradient
        for param in unet.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    wrapper = Wrapper()
    wrapper.diffusion_model = unet
    env = pieces(tmp_path, sd_model=SimpleNamespace(model=wrapper, is_sdxl=True))
    env.host.encode_prompt = train_data.sdxl_prompt_encoder(fake_conditioner(env.calls, 2048, 2816), Conditioning)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = train_a1111.run_training(request(write_images(tmp_path / "imgs", [(64, 64)] * 2)), env.host)
    assert result.steps_done == 3 and all(math.isfinite(loss) for loss in result.losses)
    saved = load_adapter(tmp_path / "Lora" / "my adapter.safetensors")
    assert len(saved.layers) == 88 and "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in saved.layers
    assert sum(bool(layer.coef.abs().sum() > 0) for layer in saved.layers.values()) == 88
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_interrupt_before_the_first_step_saves_nothing(tmp_path):
    env = pieces(tmp_path)
    env.host.state.interrupted = True
    result = train_a1111.run_training(request(write_images(tmp_path / "imgs", [(64, 64)])), env.host)
    assert result.stopped and result.steps_done == 0 and result.saved_path is None
    assert not (tmp_path / "Lora" / "my adapter.preview.png").exists() and "refresh" not in env.calls


def test_an_existing_adapter_is_never_overwritten_by_a_new_run(tmp_path):
    """Training under a taken name only continues that name's own run; a new run or a foreign file is refused
    before anything is encoded or written."""
    env = pieces(tmp_path)
    paths = write_images(tmp_path / "imgs", [(64, 64)])
    train_a1111.run_training(request(paths, steps=2), env.host)
    saved = (tmp_path / "Lora" / "my adapter.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already exists: choose another name, or tick 'Continue"):
        train_a1111.run_training(request(paths, steps=2), env.host)
    assert (tmp_path / "Lora" / "my adapter.safetensors").read_bytes() == saved
    assert train_a1111.run_training(request(paths, steps=3, resume=True), env.host).steps_done == 3  # continues
    (tmp_path / "Lora" / "downloaded.safetensors").write_bytes(saved)
    with pytest.raises(ValueError, match="no saved training state"):
        train_a1111.run_training(request(paths, name="downloaded", resume=True), env.host)
    (tmp_path / "Lora" / "old.pt").write_bytes(b"a textual LoRA of another format")
    (tmp_path / "Lora" / "old.preview.png").write_bytes(b"its card image")
    with pytest.raises(ValueError, match="old.pt already uses the name 'old'"):
        train_a1111.run_training(request(paths, name="old"), env.host)
    assert (tmp_path / "Lora" / "old.preview.png").read_bytes() == b"its card image"


def test_special_files_in_the_image_folder_are_skipped(tmp_path):
    import os

    folder = write_images(tmp_path / "imgs", [(64, 64)])[0].parent
    os.mkfifo(folder / "pipe.png")  # reading it would block while the WebUI's queue lock is held
    (folder / "dir.jpg").mkdir()
    assert [p.name for p in train_tab.collect_image_paths([], str(folder))] == ["img0.png"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"name": "../evil"}, "adapter name"), ({"name": ""}, "adapter name"), ({"image_paths": []}, "no training images"),
    ({"wavelet": "bogus"}, "unknown wavelet"), ({"budget": 0}, "n_frequency"), ({"steps": 0}, "steps"),
])
def test_bad_requests_are_clear_errors(tmp_path, overrides, message):
    env = pieces(tmp_path)
    paths = write_images(tmp_path / "imgs", [(64, 64)])
    with pytest.raises(ValueError, match=message):
        train_a1111.run_training(request(paths, **overrides), env.host)


def test_blockers_stop_a_run_before_anything_happens(tmp_path):
    assert train_a1111.blockers_for(SimpleNamespace(is_sdxl=False), False)[0].startswith("load an SDXL")
    assert "medvram" in train_a1111.blockers_for(SimpleNamespace(is_sdxl=True), True)[0]
    unet = torch.nn.Sequential(torch.nn.Linear(4, 4))
    sdxl = SimpleNamespace(is_sdxl=True, model=SimpleNamespace(diffusion_model=unet))
    assert train_a1111.blockers_for(sdxl, False) == []
    unet.to(torch.float8_e4m3fn)  # what A1111 does with "FP8 weight" on
    assert "FP8 weight" in train_a1111.blockers_for(sdxl, False)[0]
    env = pieces(tmp_path, blockers=["load an SDXL checkpoint first"])
    with pytest.raises(ValueError, match="SDXL checkpoint"):
        train_a1111.run_training(request(write_images(tmp_path / "imgs", [(64, 64)])), env.host)
    assert env.calls == []


def test_nan_latents_name_the_image(tmp_path):
    env = pieces(tmp_path, encode_image=lambda pixels: torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="img0.png.*no-half-vae"):
        train_a1111.run_training(request(write_images(tmp_path / "imgs", [(64, 64)])), env.host)


# ----------------------------------------------------------------------------- the tab's job and handler


def test_job_holds_the_lock_and_state_and_reports_errors():
    lock, state = threading.Lock(), FakeState()

    def fail():
        assert lock.locked()
        raise ValueError("boom")

    job = train_tab.TrainingJob.start(fail, lock, state)
    assert job.done.wait(5) and isinstance(job.error, ValueError) and not lock.locked()
    assert state.events == [("begin", "waveft-train"), ("end",)]


def test_only_one_job_at_a_time():
    release = threading.Event()
    job = train_tab.TrainingJob.start(lambda: release.wait(5), threading.Lock(), FakeState())
    try:
        with pytest.raises(RuntimeError, match="already in progress"):
            train_tab.TrainingJob.start(lambda: None, threading.Lock(), FakeState())
    finally:
        release.set()
        job.done.wait(5)


def test_train_clicked_streams_status_then_a_summary_and_loss_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tab, "POLL_SECONDS", 0.01)
    env = pieces(tmp_path)
    paths = train_tab.collect_image_paths([SimpleNamespace(name=str(p)) for p in write_images(tmp_path / "a", [(64, 64)])],
                                          str(write_images(tmp_path / "b", [(64, 64)])[0].parent))
    assert len(paths) == 2
    outputs = list(train_tab.train_clicked(request(paths), lambda: env.host, threading.Lock(), env.host.state))
    status, plot = outputs[-1]
    assert status.startswith("Trained 3 steps") and "<waveft:my adapter:1>" in status
    assert plot.shape[2] == 3 and plot.dtype.name == "uint8"


def test_a_second_page_follows_the_running_job_from_its_first_step(tmp_path, monkeypatch):
    """What a reloaded or second page shows: the running job's status from step 1 on, then its summary."""
    monkeypatch.setattr(train_tab, "POLL_SECONDS", 0.01)
    env = pieces(tmp_path)
    paths = write_images(tmp_path / "a", [(64, 64)])
    statuses: list[str] = []
    original = env.host.state

    class Watched(type(original)):  # records every status the job writes
        def __setattr__(self, name, value):
            if name == "textinfo" and value:
                statuses.append(value)
            super().__setattr__(name, value)

    env.host.state.__class__ = Watched
    first = train_tab.train_clicked(request(paths), lambda: env.host, threading.Lock(), env.host.state)
    assert next(first)[0].startswith("WaveFT: starting")
    following = list(train_tab.status_clicked(env.host.state))  # a second page, while the run goes on
    rest = list(first)
    assert following[-1][0] == rest[-1][0] and following[-1][0].startswith("Trained 3 steps")
    assert any(s.startswith("WaveFT training: step 1/3 running") for s in statuses)
    assert statuses.index(next(s for s in statuses if "step 1/3 running" in s)) < statuses.index(
        next(s for s in statuses if s.startswith("WaveFT training: step 1/3, loss")))


def test_status_before_any_run():
    train_tab.TrainingJob.current = None
    assert list(train_tab.status_clicked(object())) == [("No WaveFT training has run since the WebUI started.", None)]


def test_tab_builds_with_the_installed_gradio():
    """The tab's layout and events with real gradio (A1111 1.10 ships 3.41, Forge 4.x): labels, one Train event
    with the thirteen inputs the handler takes, Interrupt, and Show status (a button and on page load)."""
    gr = pytest.importorskip("gradio", reason="gradio is not installed (A1111 1.10 ships 3.41, Forge 4.x)")
    if not hasattr(gr, "Blocks"):  # pytest puts the checkout's parent on sys.path (the root is a package): a
        pytest.skip(f"'gradio' here is not gradio but {gr!r}")  # folder such as /tmp/gradio imports as a namespace
    [(blocks, title, elem_id)] = train_tab.create_tab()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("WaveFT Train", "waveft_train")
    config = blocks.get_config_file()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Training images", "Instance prompt", "Budget p per layer", "Wavelet", "Status", "Loss"} <= labels
    assert "Gradient checkpointing (less memory, ~30% slower)" in labels
    events = sorted((len(d["inputs"]), len(d["outputs"])) for d in config["dependencies"])
    assert events == [(0, 0), (0, 2), (0, 2), (13, 2)]
    wavelets = next(c for c in config["components"] if c.get("props", {}).get("label") == "Wavelet")["props"]
    assert "db1" in str(wavelets["choices"]) and "coif17" in str(wavelets["choices"])
