"""The fused layer (``WAVEFT_KERNELS=fused``) against float64 references, and the per-device timed choice."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from oracles import linear_reference, rel_error

import waveft_core.kernel_choice as kernel_choice
import waveft_core.plans as plans
from waveft_core import WaveFTLinear


@pytest.fixture
def fused(monkeypatch) -> list[int]:
    """Pins the fused layer; the list counts the calls that really took it."""
    import waveft_core.layer as layer_module

    calls: list[int] = []
    real = layer_module.fused_linear
    monkeypatch.setattr(layer_module, "fused_linear", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setenv("WAVEFT_KERNELS", "fused")
    plans.clear_caches()
    yield calls
    plans.clear_caches()


def _layer(out_features: int, in_features: int, n: int, wavelet: str, dtype: torch.dtype, seed: int = 0) -> WaveFTLinear:
    torch.manual_seed(seed)
    layer = WaveFTLinear(torch.nn.Linear(in_features, out_features).to(dtype), n, wavelet)
    with torch.no_grad():
        layer.coef.normal_()
    return layer


CASES = [  # out, in, n, wavelet, dtype, output tolerance (the merged weight and the output rounded once each)
    (64, 48, 100, "db1", torch.float32, 1e-5),
    (33, 17, 20, "db4", torch.float32, 1e-5),
    (3, 9, 2, "sym3", torch.float32, 1e-5),
    (640, 640, 2592, "db1", torch.float32, 1e-5),
    (320, 256, 500, "db4", torch.bfloat16, 2**-7),
    (64, 48, 100, "db2", torch.float16, 2**-9),
]


@pytest.mark.parametrize("out_features,in_features,n,wavelet,dtype,tolerance", CASES)
def test_fused_matches_the_float64_reference(fused, out_features, in_features, n, wavelet, dtype, tolerance):
    layer = _layer(out_features, in_features, n, wavelet, dtype)
    x = torch.randn(3, 5, in_features, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = linear_reference(layer, x, grad)
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.coef.grad.dtype == torch.float32
    assert rel_error(y.reshape(y_ref.shape), y_ref) <= tolerance
    assert rel_error(x.grad.reshape(gx_ref.shape), gx_ref) <= tolerance
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-4  # g^T x is summed in float32 whatever the dtype
    assert fused  # the fused layer ran (it takes frozen layers whose tap index stays near the weight's size)


def test_fused_fp16_with_loss_scaling_does_not_overflow(fused):
    """A loss scale of 2^16 makes fp16 ``g^T x`` entries overflow if summed in fp16; they are summed in float32."""
    layer = _layer(64, 64, 200, "db1", torch.float16)
    x = torch.randn(1, 512, 64, dtype=torch.float16, requires_grad=True) * 4
    grad = torch.randn(1, 512, 64, dtype=torch.float16) * 2**14
    layer(x).backward(grad)
    _, _, gc_ref = linear_reference(layer, x, grad.float())
    assert torch.isfinite(layer.coef.grad).all() and rel_error(layer.coef.grad, gc_ref) <= 1e-4


def test_fused_under_autocast_computes_in_the_autocast_dtype(fused):
    layer = _layer(64, 48, 100, "db1", torch.float32)
    x = torch.randn(4, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = linear_reference(layer, x.detach().bfloat16(), grad)
    assert x.grad.dtype == torch.float32
    assert rel_error(y, y_ref) <= 2**-7 and rel_error(x.grad, gx_ref) <= 2**-7
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-4


def test_fused_casts_stored_weights_like_a_manual_cast_layer(fused):
    """fp16 weights, float32 activations (ComfyUI's text encoders): computed in float32, the weight untouched."""
    layer = _layer(40, 24, 50, "db2", torch.float16)
    stored = layer.base.weight.detach().clone()
    x = torch.randn(6, 24, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    y_ref, _, gc_ref = linear_reference(layer, x, torch.ones_like(y))
    assert y.dtype == torch.float32 and rel_error(y, y_ref) <= 1e-5 and rel_error(layer.coef.grad, gc_ref) <= 1e-5
    assert torch.equal(layer.base.weight, stored)


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_under_gradient_checkpointing_gives_the_same_gradients(fused, reentrant):
    layer = _layer(48, 32, 80, "db3", torch.float32)
    x = torch.randn(2, 7, 32, requires_grad=True)
    layer(x).square().sum().backward()
    plain_x, plain_c = x.grad.clone(), layer.coef.grad.clone()
    x.grad, layer.coef.grad = None, None
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    assert torch.equal(x.grad, plain_x) and torch.equal(layer.coef.grad, plain_c)


def test_fused_keeps_inference_weights_and_the_base_bit_identical(fused):
    with torch.inference_mode():
        base = torch.nn.Linear(48, 64)
    original = base.weight.detach().clone()
    layer = WaveFTLinear(base, 300, "db2")
    optimizer = torch.optim.SGD([layer.coef], lr=0.1)
    for _ in range(3):
        layer(torch.randn(5, 48, requires_grad=True)).pow(2).sum().backward()
        optimizer.step()
    assert layer.coef.abs().sum() > 0 and torch.equal(base.weight, original)


def test_fused_launches_no_more_kernels_than_lora_r1(fused):
    """The issue's target, counted as ``benchmarks/op_count.py`` does: LoRA r1 adds 12 kernels to a frozen
    layer's forward + backward; the fused layer adds at most that in float32 and bf16."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from op_count import measure

    for dtype in (torch.float32, torch.bfloat16):
        def base(dtype=dtype):
            return torch.nn.Linear(48, 64).to(dtype).requires_grad_(False)

        def adapted(dtype=dtype):
            return WaveFTLinear(base(), 40)

        base_kernels, _, _ = measure(base, dtype, repeats=1)
        kernels, ops, _ = measure(adapted, dtype, repeats=1)
        assert kernels - base_kernels <= 12, (dtype, ops)
        assert not any("sparse" in name for name in ops)


def test_unpinned_choice_is_timed_once_per_shape_class_and_logged(monkeypatch, caplog):
    monkeypatch.delenv("WAVEFT_KERNELS", raising=False)
    plans.clear_caches()
    timed = []
    monkeypatch.setattr(kernel_choice, "_seconds", lambda run, device: (run(), timed.append(run), 0.5 if len(timed) == 1 else 0.25)[2])
    layer_a, layer_b = _layer(64, 48, 100, "db1", torch.float32), _layer(64, 48, 100, "db1", torch.float32, seed=1)
    with caplog.at_level(logging.INFO, logger="WaveFT"):
        for layer in (layer_a, layer_b, layer_a):
            layer(torch.randn(2, 30, 48)).sum().backward()
    assert len(timed) == 2  # plan, then fused, for the one class both layers share
    lines = [r.getMessage() for r in caplog.records if "WaveFT kernels on cpu" in r.getMessage()]
    assert len(lines) == 1 and "64x48" in lines[0] and ": fused (" in lines[0]
    assert layer_a.coef.grad is not None and torch.isfinite(layer_a.coef.grad).all()
    layer_a(torch.randn(2, 300, 48)).sum().backward()  # 300 tokens: another class, timed anew
    assert len(timed) == 4
    plans.clear_caches()


def test_pinned_or_untimeable_choices_are_not_timed(monkeypatch):
    monkeypatch.setattr(kernel_choice, "_seconds", lambda run, device: pytest.fail("timed"))
    layer = _layer(64, 48, 100, "db1", torch.float32)
    for name in ("sparse", "portable", "fused"):
        monkeypatch.setenv("WAVEFT_KERNELS", name)
        plans.clear_caches()
        layer(torch.randn(3, 48)).sum().backward()
    monkeypatch.delenv("WAVEFT_KERNELS")
    plans.clear_caches()
    monkeypatch.setattr(kernel_choice, "_can_time", lambda device: False)
    assert kernel_choice.choose("key", torch.device("cpu"), {"plan": None, "fused": None}) == "plan"
    assert kernel_choice.choose("key", torch.device("cuda"), {"plan": None, "fused": None}) == "fused"
    plans.clear_caches()


def test_a_timing_failure_keeps_the_default_and_says_why(monkeypatch, caplog):
    def out_of_memory(run, device):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kernel_choice, "_seconds", out_of_memory)
    plans.clear_caches()
    with caplog.at_level(logging.INFO, logger="WaveFT"):
        assert kernel_choice.choose("k", torch.device("cpu"), {"plan": None, "fused": None}) == "plan"
    assert "could not time" in caplog.text and "out of memory" in caplog.text
    plans.clear_caches()


def test_real_timing_picks_a_correct_family_on_this_cpu(monkeypatch):
    """Unpinned, the timed choice runs both for real and the layer is exact whichever wins."""
    monkeypatch.delenv("WAVEFT_KERNELS", raising=False)
    plans.clear_caches()
    layer = _layer(320, 256, 500, "db2", torch.float32)
    x = torch.randn(1, 64, 256, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    y_ref, gx_ref, gc_ref = linear_reference(layer, x, torch.ones_like(y))
    assert list(kernel_choice._CHOSEN.values())[0] in ("plan", "fused")
    assert rel_error(y.reshape(y_ref.shape), y_ref) <= 1e-5 and rel_error(layer.coef.grad, gc_ref) <= 1e-5
    plans.clear_caches()


@pytest.mark.parametrize("reentrant", [False, True])
def test_first_timed_choice_inside_gradient_checkpointing(monkeypatch, reentrant):
    """The first step of a run times the choices inside the checkpointed blocks: the recomputation (which
    finds the choice made) must see the same saved tensors as the forward did, and the gradients not change."""
    monkeypatch.delenv("WAVEFT_KERNELS", raising=False)
    layer = _layer(48, 32, 80, "db3", torch.float32)
    x = torch.randn(2, 7, 32, requires_grad=True)
    plans.clear_caches()
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    assert kernel_choice._CHOSEN  # the choice was timed inside the checkpoint
    checkpointed_x, checkpointed_c = x.grad.clone(), layer.coef.grad.clone()
    x.grad, layer.coef.grad = None, None
    layer(x).square().sum().backward()
    assert torch.equal(x.grad, checkpointed_x) and torch.equal(layer.coef.grad, checkpointed_c)
    plans.clear_caches()
