"""Data-parallel training through real ``accelerate launch`` subprocesses on the CPU (two processes, gloo).

accelerate (1.x) starts several CPU processes only with ``--multi_gpu`` (torchrun) or mpirun:
``accelerate launch --cpu --num_processes 2`` starts ONE process, which the trainer refuses with the working
command rather than silently training with half the global batch.

Tolerances: float32 with AdamW (eps 1e-8) turns rounding-level gradient differences of coefficients whose
gradient is itself at rounding level (~1e-9; a handful of 90k) into updates of up to ~0.2 x lr, so the
coefficient vectors agree to ~5e-4 relative after a few steps while the trained models' outputs agree to
~1e-4 of the adapter's effect; the float64 check in test_trainer_headless.py agrees to < 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from headless_layout import write_tiny_sdxl
from packs import ROOT

import waveft_core
from trainer.demo import diffusers_denoise, merged_copy, synthetic_subject, tiny_sdxl_unet

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _launch(*args: str) -> subprocess.CompletedProcess:
    return _run(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", *args)  # fmt: skip


def _coefs(path: Path) -> torch.Tensor:
    adapter = waveft_core.load_adapter(path)
    return torch.cat([adapter.layers[k].coef for k in sorted(adapter.layers)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _output_difference(path_a: Path, path_b: Path) -> float:
    """|f_A - f_B| / |f_A - f_base| on fixed inputs: how differently the two adapters change the tiny UNet."""
    torch.manual_seed(0)
    base, data = tiny_sdxl_unet().eval(), synthetic_subject()
    latents, cond = data.collate([0, 2, 4, 6], torch.device("cpu"), torch.float32)
    t = torch.tensor([100, 400, 700, 900])
    with torch.no_grad():
        outs = [diffusers_denoise(m.eval())(latents, t, cond) for m in
                (base, merged_copy(base, waveft_core.load_adapter(path_a)), merged_copy(base, waveft_core.load_adapter(path_b)))]  # fmt: skip
    return float((outs[1] - outs[2]).norm() / (outs[1] - outs[0]).norm())


def test_accelerate_demo_two_processes_equal_one_with_twice_the_batch(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run(sys.executable, "-m", "trainer", "demo", "--steps", "3", "--batch-size", "2", "--output", str(one))
    launched = _launch("demo", "--steps", "3", "--batch-size", "1", "--output", str(two))
    assert "2 processes x batch 1 (global batch 2)" in launched.stdout
    assert launched.stdout.count("saved ") == 1  # rank 0 alone reports (and writes)
    assert _output_difference(two, one) < 1e-4
    assert _relative(_coefs(two), _coefs(one)) < 2e-3
    assert waveft_core.load_adapter(two).metadata["ss_steps"] == "3"


def test_accelerate_train_resumes_with_another_process_count(tmp_path):
    tiny = write_tiny_sdxl(tmp_path / "tiny.safetensors")
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    gen = torch.Generator().manual_seed(3)
    for index, (w, h) in enumerate([(64, 64), (64, 64), (80, 60), (80, 60)]):
        Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(images / f"{index}.png")
    common = ["--checkpoint", str(tiny), "--images", str(images), "--prompt", "a photo of zjw dog", "--resolution",
              "64", "--n-frequency", "64", "--grad-accum", "1", "--learning-rate", "0.01"]  # fmt: skip
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    _run(sys.executable, "-m", "trainer", "train", *common, "--output", str(whole), "--steps", "4", "--batch-size", "2")
    _run(sys.executable, "-m", "trainer", "train", *common, "--output", str(part), "--steps", "2", "--batch-size", "2")
    _launch("train", *common, "--output", str(part), "--steps", "4", "--batch-size", "1", "--resume")
    adapter = waveft_core.load_adapter(part)
    assert adapter.metadata["ss_steps"] == "4" and adapter.metadata["waveft_train_processes"] == "2"
    assert _relative(_coefs(part), _coefs(whole)) < 2e-3
    assert _coefs(whole).abs().max() > 0  # a trained adapter, not an empty one
    mismatch = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "-m", "trainer", "train", *common,
         "--output", str(part), "--steps", "6", "--batch-size", "2", "--resume"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert mismatch.returncode != 0 and "settings.batch_size" in mismatch.stdout + mismatch.stderr


def test_accelerate_cpu_flag_with_several_processes_is_refused(tmp_path):
    result = subprocess.run(
        [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "-m", "trainer", "demo", "--steps", "1",
         "--output", str(tmp_path / "x.safetensors")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "--multi_gpu" in result.stderr + result.stdout
    assert not (tmp_path / "x.safetensors").exists()
