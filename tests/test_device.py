"""The core and the trainer on an accelerator, against float64 references computed on the CPU.

Skipped where no CUDA device is present. ``WAVEFT_TEST_DEVICE=cpu`` runs the same checks on the CPU: that is
how their logic is checked on machines without a GPU (``WAVEFT_TEST_DEVICE=cuda:1`` picks another card,
``WAVEFT_TEST_DEVICE=mps`` an Apple GPU). Every check runs on each kernel family and on the timed choice (``kernels`` fixture).
"""

from __future__ import annotations

import os

import pytest
import torch
from oracles import linear_reference, rel_error
from trainer_toys import ToyDenoiser, toy_data, toy_denoise, toy_prefix, toy_settings

import waveft_core.plans as plans
import waveft_core.portable_ops as portable_ops
import waveft_core.sparse_ops as sparse_ops
from trainer import train_waveft
from waveft_core import WaveFTLinear, add_delta_, load_adapter

DEVICE = torch.device(os.environ.get("WAVEFT_TEST_DEVICE", "cuda"))


def _device_present() -> bool:
    try:
        torch.empty(1, device=DEVICE)
    except (RuntimeError, AssertionError):  # torch without CUDA raises AssertionError ("not compiled with CUDA")
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _device_present(), reason=f"no {DEVICE} device here (WAVEFT_TEST_DEVICE=cpu runs these checks on the CPU)"
)


@pytest.fixture(autouse=True, params=["sparse", "portable", "fused", "auto"])
def kernels(request, monkeypatch) -> str:
    """Each check runs on every kernel family, pinned by ``WAVEFT_KERNELS``: the sparse ones (where the device
    has them), the portable ones that devices without sparse CSR support get, the fused layer, and the
    choice timed on the device (``auto``)."""
    monkeypatch.setenv("WAVEFT_KERNELS", request.param)
    plans.clear_caches()
    if request.param == "portable":
        monkeypatch.setattr(plans, "sparse_kernels_work", lambda device: False)
    elif request.param == "sparse" and not plans.sparse_kernels_work(DEVICE):
        pytest.skip(f"{DEVICE} has no working sparse CSR kernels (the portable ones are checked)")
    yield request.param
    plans.clear_caches()


PATHS = [  # (weight dtype, base trainable, tolerance): the first is the weight-side path, the others activation-side
    (torch.float32, False, 1e-5),
    (torch.float32, True, 1e-5),
    (torch.bfloat16, False, 2**-7),  # outputs and dL/dx are rounded to bf16 once
]


@pytest.mark.parametrize("dtype,trainable,tolerance", PATHS)
@pytest.mark.parametrize("out_features,in_features,tokens,n,wavelet", [(640, 640, 300, 2592, "db1"), (320, 2048, 77, 500, "db4")])
def test_layer_matches_the_float64_reference(out_features, in_features, tokens, n, wavelet, dtype, trainable, tolerance):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features).to(DEVICE, dtype)
    layer = WaveFTLinear(base, n, wavelet)
    base.requires_grad_(trainable)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(1, tokens, in_features, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = linear_reference(layer, x, grad)
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.coef.grad.dtype == torch.float32
    assert rel_error(y.reshape(y_ref.shape), y_ref) <= tolerance
    assert rel_error(x.grad.reshape(gx_ref.shape), gx_ref) <= tolerance
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-4  # float32 sums over the tokens, whatever the dtype


def test_long_sequences_in_several_device_chunks(monkeypatch, kernels):
    """A device chunk holds up to ``DEVICE_CHUNK_ELEMENTS`` (portable: ``CHUNK_ELEMENTS``); made small,
    1000 tokens take several chunks."""
    if kernels not in ("sparse", "portable"):
        pytest.skip("a trainable base always runs on the plan family (checked as sparse and portable)")
    monkeypatch.setattr(sparse_ops, "DEVICE_CHUNK_ELEMENTS", 64 * 64 * 3)
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMENTS", 64 * 64 * 3)
    monkeypatch.setattr(portable_ops, "CHUNK_ELEMENTS", 300 * 64)
    torch.manual_seed(1)
    layer = WaveFTLinear(torch.nn.Linear(64, 64).to(DEVICE), 300, "sym4")
    layer.base.requires_grad_(True)  # activation side: the chunked products carry the whole update
    if kernels == "sparse":
        assert len(sparse_ops.token_chunks(1000, layer.plan(DEVICE), DEVICE)) > 3
    else:
        assert portable_ops._chunk_tokens(layer.plan(DEVICE)) == 64
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(2, 500, 64, device=DEVICE, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = linear_reference(layer, x, grad)
    assert rel_error(y.reshape(y_ref.shape), y_ref) <= 1e-5 and rel_error(x.grad.reshape(gx_ref.shape), gx_ref) <= 1e-5
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patching_a_device_weight_equals_the_cpu_result(dtype):
    """What the loaders do: ``W += dW`` in place; half precision is summed in float32 and rounded once."""
    torch.manual_seed(2)
    weight = torch.randn(320, 640).to(dtype)
    coef = torch.randn(2592) * 0.01
    positions = torch.randperm(320 * 640)[:2592]
    expected = add_delta_(weight.clone(), coef, positions, "db2", 25.0)
    patched = add_delta_(weight.to(DEVICE), coef.to(DEVICE), positions.to(DEVICE), "db2", 25.0)
    # float32 atomics may add a patch's overlapping taps in another order: at most one rounding apart
    torch.testing.assert_close(patched.cpu(), expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_trainer_runs_saves_and_restores_on_the_device(tmp_path):
    model = ToyDenoiser().to(DEVICE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "device.safetensors"
    result = train_waveft(
        model, toy_denoise(model), toy_data(), toy_settings(steps=4), name_to_prefix=toy_prefix, output_path=out
    )
    assert result.steps_done == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    adapter = load_adapter(out)
    assert adapter.layers and all(layer.coef.abs().sum() > 0 for layer in adapter.layers.values())
