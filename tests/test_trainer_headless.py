"""The headless trainer in-process: single-file loader, non-SDXL detection, run files, the CLI end to end,
the cache, stop + resume, and the engine's data-parallel hook (two ranks in threads)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from headless_layout import write_tiny_sdxl
from safetensors.torch import load_file, save_file
from trainer_toys import one_thread  # noqa: F401  (fixture)

import waveft_core
from trainer import train_waveft
from trainer.demo import demo_settings, diffusers_denoise, diffusers_name_to_prefix, synthetic_subject, tiny_sdxl_unet
from trainer.headless import cli, run
from trainer.headless.config import load_run_file
from trainer.headless.single_file import CheckpointReader, NotSDXLError, identify, load_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors", torch.float16)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("dog")
    gen = torch.Generator().manual_seed(1)
    for index, (w, h) in enumerate([(64, 64), (80, 60), (64, 64), (60, 80)]):
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loader_reads_sizes_from_shapes_and_maps_weights(tmp_path, dtype):
    path = write_tiny_sdxl(tmp_path / "m.safetensors", dtype, v_pred=dtype == torch.bfloat16)
    raw = load_file(str(path))
    ckpt = load_sdxl(path)
    assert ckpt.file_dtype == dtype
    assert ckpt.prediction_type == ("v_prediction" if dtype == torch.bfloat16 else "epsilon")
    assert not ckpt.zero_terminal_snr
    unet = ckpt.unet
    assert list(unet.config.block_out_channels) == [32, 64, 128] and unet.config.cross_attention_dim == 64
    assert unet.config.projection_class_embeddings_input_dim == 6 * 8 + 32 and unet.config.addition_time_embed_dim == 8
    to_k = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(to_k, raw["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].float())
    in_proj = raw["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"].float()
    layer = ckpt.text_encoder_2.text_model.encoder.layers[1] if hasattr(ckpt.text_encoder_2, "text_model") else None
    layer = layer or ckpt.text_encoder_2.encoder.layers[1]
    assert torch.equal(layer.self_attn.k_proj.weight, in_proj[32:64])
    assert torch.equal(ckpt.text_encoder_2.text_projection.weight, raw["conditioner.embedders.1.model.text_projection"].float().T)
    assert sum(name.endswith("to_q") for name, _ in unet.named_modules()) == 22
    latent = ckpt.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 4, 8, 8)  # four VAE levels: 1/8 of the image, as SDXL


SDXL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
    "first_stage_model.encoder.conv_in.weight", "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
}  # fmt: skip


@pytest.mark.parametrize(
    "keys, says",
    [
        ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
          "model.diffusion_model.input_blocks.0.0.weight"}, "Stable Diffusion 1.x"),
        ({"cond_stage_model.model.token_embedding.weight", "model.diffusion_model.out.2.weight"}, "Stable Diffusion 2.x"),
        ({"conditioner.embedders.0.model.token_embedding.weight", "model.diffusion_model.out.2.weight"}, "SDXL refiner"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight", "img_in.weight"}, "FLUX"),
        ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight"}, "LoRA"),
        ({"lora_unet_x_attn1_to_q.waveft_coef"}, "WaveFT adapter"),
        ({"down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"}, "diffusers-layout"),
        (SDXL_KEYS - {"first_stage_model.encoder.conv_in.weight"}, "lacks the VAE"),
        ({"model.diffusion_model.input_blocks.0.0.weight"}, "partial SDXL checkpoint"),
        (SDXL_KEYS - {"model.diffusion_model.label_emb.0.0.weight"}, "label_emb"),
        ({"something.else"}, "not an SDXL checkpoint"),
    ],
)  # fmt: skip
def test_non_sdxl_files_are_named(keys, says):
    with pytest.raises(NotSDXLError, match=says):
        identify(keys, "model.safetensors")


def test_non_sdxl_file_and_pickles_refused(tmp_path):
    identify(SDXL_KEYS)  # the key set above is whole
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}, str(sd15))
    with pytest.raises(NotSDXLError, match="sd15.safetensors is Stable Diffusion 1.x"):
        CheckpointReader(sd15)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(NotSDXLError, match="never pickled"):
        CheckpointReader(tmp_path / "old.ckpt")
    assert cli.main(["--checkpoint", str(sd15), "--images", ".", "--prompt", "p", "--output", "o.safetensors"]) == 2


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


SUBJECT = '[[subject]]\nimages = "a"\nprompt = "a photo of zjw dog"\noutput = "a.safetensors"\n'


@pytest.mark.parametrize(
    "text, message",
    [
        ('checkpoint = "m.safetensors"\nbogus = 1\n' + SUBJECT, "unknown key.*bogus.*top-level keys are"),
        ('checkpoint = "m.safetensors"\nsteps = 3\n' + SUBJECT, r"under \[train\]"),
        ('checkpoint = "m.safetensors"\n' + SUBJECT + "stepz = 3\n", "unknown option.*stepz.*option keys are"),
        ('checkpoint = "m.safetensors"\n[[subject]]\nimages = "a"\noutput = "a.safetensors"\n', "lacks prompt"),
        ('checkpoint = "m.safetensors"\n[train]\nlr_scheduler = "exp"\n' + SUBJECT,
         "lr_scheduler must be one of 'constant', 'linear', 'cosine'"),
        ('checkpoint = "m.safetensors"\nmodel_dtype = "fp8"\n' + SUBJECT, "model_dtype must be one of 'auto'"),
        ('checkpoint = "m.safetensors"\n', "at least one subject"),
        (SUBJECT, "no checkpoint"),
        ('checkpoint = "m.safetensors\n', "not valid TOML"),
        ('checkpoint = "m.safetensors"\n' + SUBJECT + SUBJECT, "same output"),
    ],
)  # fmt: skip
def test_run_file_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_run_file(_toml(tmp_path, text), {})


def test_run_file_precedence_and_paths(tmp_path):
    text = 'checkpoint = "m.safetensors"\n[train]\nsteps = 7\nlearning_rate = 0.5\nn_frequency = 9\n'
    text += SUBJECT + "steps = 3\n" + SUBJECT.replace('"a', '"b')
    config = load_run_file(_toml(tmp_path, text), {"learning_rate": 0.25})
    first, second = (config.subject_options(s) for s in config.subjects)
    assert first == {"steps": 3, "learning_rate": 0.25, "n_frequency": 9}  # subject > command line > [train]
    assert second["steps"] == 7 and config.checkpoint == tmp_path / "m.safetensors"
    assert config.subjects[1].images == tmp_path / "b"
    argv = ["--config", str(tmp_path / "run.toml"), "--position-seed", "5", "--min-snr-gamma", "none"]
    parsed = cli.parse_config(argv + ["--timestep-range", "10", "900", "--no-gradient-checkpointing"])
    assert parsed.options["position_seed"] == 5 and parsed.options["timestep_range"] == [10, 900]
    assert parsed.options["gradient_checkpointing"] is False and parsed.options["min_snr_gamma"] is None
    with pytest.raises(ValueError, match="cannot be combined with --config"):
        cli.parse_config(argv + ["--prompt", "x"])


def _argv(tiny: Path, images: Path, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(tiny), "--images", str(images), "--prompt", "a photo of zjw dog", "--output",
            str(output), "--resolution", "64", "--n-frequency", "64", "--grad-accum", "1", "--batch-size", "2",
            "--learning-rate", "0.01", *extra]  # fmt: skip


def _coefs(path: Path) -> torch.Tensor:
    adapter = waveft_core.load_adapter(path)
    return torch.cat([adapter.layers[k].coef for k in sorted(adapter.layers)])


def test_cli_end_to_end_and_cache_reuse(tmp_path, tiny, images, monkeypatch):
    out = tmp_path / "zjw.safetensors"
    cache = tmp_path / "cache"
    assert cli.main(_argv(tiny, images, out, "--steps", "3", "--cache-dir", str(cache))) == 0
    adapter = waveft_core.load_adapter(out)
    assert len(adapter.layers) == 88 and all(layer.coef.numel() == 64 for layer in adapter.layers.values())
    assert adapter.metadata["ss_steps"] == "3" and adapter.metadata["waveft_instance_prompt"] == "a photo of zjw dog"
    assert adapter.metadata["ss_sd_model_name"] == "tiny_sdxl.safetensors"
    assert adapter.metadata["waveft_train_prediction_type"] == "epsilon"
    assert (tmp_path / "zjw_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _coefs(out).abs().max() > 0
    first = _coefs(out)
    assert cli.main(_argv(tiny, images, out, "--steps", "3")) == 2  # exists: needs --resume or --overwrite
    again = run.run(cli.parse_config(_argv(tiny, images, out, "--steps", "3", "--overwrite", "--cache-dir", str(cache))))
    assert again["encoded"] == {"images": 0, "prompts": 0, "loads": 0}  # all from the cache, no encoder loaded
    assert torch.equal(_coefs(out), first)  # the cached latents and embeddings train the same adapter
    fresh = run.run(cli.parse_config(_argv(tiny, images, tmp_path / "nocache.safetensors", "--steps", "3")))
    assert fresh["encoded"] == {"images": 4, "prompts": 1, "loads": 1}
    assert torch.allclose(_coefs(tmp_path / "nocache.safetensors"), _coefs(out), atol=1e-6)  # cache == fresh


@pytest.mark.parametrize("how", ["sigterm", "keyboard"])
def test_stop_saves_and_resume_matches_an_uninterrupted_run(tmp_path, tiny, images, monkeypatch, how):
    whole = tmp_path / "whole.safetensors"
    assert cli.main(_argv(tiny, images, whole, "--steps", "5")) == 0

    class Interrupting:
        def __call__(self, step: int, total: int, loss: float) -> None:
            if step == 2:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)  # what a batch scheduler sends; stops after this step
                else:
                    raise KeyboardInterrupt  # a second Ctrl-C: stops at once, the completed step is saved

    monkeypatch.setattr(run, "TextProgress", Interrupting)
    part = tmp_path / "part.safetensors"
    if how == "sigterm":
        assert cli.main(_argv(tiny, images, part, "--steps", "5")) == 128 + signal.SIGTERM
    else:
        with pytest.raises(KeyboardInterrupt):
            cli.main(_argv(tiny, images, part, "--steps", "5"))
    assert waveft_core.load_adapter(part).metadata["ss_steps"] == "2"
    monkeypatch.undo()
    assert cli.main(_argv(tiny, images, part, "--steps", "5", "--resume")) == 0
    assert waveft_core.load_adapter(part).metadata["ss_steps"] == "5"
    assert torch.allclose(_coefs(part), _coefs(whole), rtol=0, atol=1e-7)


class _ThreadGroup:
    """A process group of threads: enough to run the engine's data-parallel path in one process."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def member(self, rank: int):
        group = self

        class Member:
            def __init__(self) -> None:
                self.rank, self.world_size = rank, group.world

            def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
                group.slots[rank] = tensor.clone()
                group.barrier.wait()
                total = sum(group.slots[1:], group.slots[0].clone())
                group.barrier.wait()
                return total

        return Member()


def test_engine_data_parallel_hook_equals_one_process(tmp_path):
    """Two ranks with batch 1 train what one process with batch 2 trains (float64 model); only rank 0 writes."""
    base, data = tiny_sdxl_unet().double(), synthetic_subject()

    def train(batch: int, output: Path, distributed=None) -> torch.Tensor:
        unet = copy.deepcopy(base)
        result = train_waveft(unet, diffusers_denoise(unet), data, demo_settings(4, 777, batch), output_path=output,
                              name_to_prefix=diffusers_name_to_prefix, distributed=distributed)  # fmt: skip
        return torch.cat([result.layers[k].coef for k in sorted(result.layers)])

    single = train(2, tmp_path / "single.safetensors")
    group, coefs = _ThreadGroup(2), [None, None]
    paths = [tmp_path / "rank0.safetensors", tmp_path / "rank1.safetensors"]

    def worker(rank: int) -> None:
        coefs[rank] = train(1, paths[rank], group.member(rank))

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(coefs[0], coefs[1])  # the ranks never drift apart
    assert float((coefs[0] - single).norm() / single.norm()) < 1e-5
    assert paths[0].exists() and not paths[1].exists()
    assert torch.equal(_coefs(paths[0]), coefs[0])


def test_run_file_trains_each_subject_on_one_loaded_unet(tmp_path, tiny, images, monkeypatch):
    loads = []
    real_load = run.load_sdxl
    monkeypatch.setattr(run, "load_sdxl", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    text = f'checkpoint = "{tiny}"\n[train]\nsteps = 2\nresolution = 64\nn_frequency = 32\ngrad_accum = 1\n'
    for name, extra in (("dog", "steps = 3\n"), ("cat", "wavelet = \"db2\"\n")):
        text += f'[[subject]]\nimages = "{images}"\nprompt = "a photo of zjw {name}"\noutput = "{name}.safetensors"\n'
        text += extra
    assert cli.main(["--config", str(_toml(tmp_path, text)), "--learning-rate", "0.02"]) == 0
    assert loads == [("unet",)]  # the UNet once for both subjects
    dog, cat = (waveft_core.load_adapter(tmp_path / f"{n}.safetensors") for n in ("dog", "cat"))
    assert (dog.metadata["ss_steps"], cat.metadata["ss_steps"]) == ("3", "2")
    assert cat.metadata["waveft_instance_prompt"] == "a photo of zjw cat" and dog.metadata["ss_learning_rate"] == "0.02"
    assert {layer.wavelet for layer in cat.layers.values()} == {"db2"} and (tmp_path / "cat_loss.png").exists()


def test_a_damaged_image_is_named(tmp_path, tiny, images):
    folder = tmp_path / "dog"
    shutil.copytree(images, folder)  # the shared folder stays intact for the other tests
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match=r"zz_broken.png is not a readable image \(UnidentifiedImageError"):
        run.run(cli.parse_config(_argv(tiny, folder, tmp_path / "x.safetensors", "--steps", "1")))
    assert not (tmp_path / "x.safetensors").exists()


def test_a_ztsnr_file_trains_v_prediction_on_a_zero_terminal_snr_schedule(tmp_path, tiny, images):
    """NoobAI-XL V-pred files carry ``v_pred`` and ``ztsnr`` keys: the run follows both unless told otherwise."""
    tensors = load_file(str(tiny))
    save_file({**tensors, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(tmp_path / "noob.safetensors"))
    checkpoint = load_sdxl(tmp_path / "noob.safetensors", parts=())
    assert checkpoint.prediction_type == "v_prediction" and checkpoint.zero_terminal_snr
    out = tmp_path / "noob_subject.safetensors"
    assert cli.main(_argv(tmp_path / "noob.safetensors", images, out, "--steps", "1")) == 0
    meta = waveft_core.load_adapter(out).metadata
    assert meta["waveft_train_prediction_type"] == "v_prediction" and meta["waveft_train_zero_terminal_snr"] == "True"
    assert cli.main(_argv(tmp_path / "noob.safetensors", images, out, "--steps", "1", "--overwrite",
                          "--prediction-type", "epsilon")) == 2  # fmt: skip  (refused: eps is undefined at pure noise)
