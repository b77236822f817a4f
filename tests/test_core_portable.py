"""The portable kernels (convolutions and gathers, for devices without sparse CSR support, e.g. Apple's MPS):
the 1-D transforms against PyWavelets, the update and its gradients against float64 references, the device
probe, and a layer and a training run on them equal to the sparse kernels' results."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pywt
import torch
from oracles import coef_grad_from_weight_grad, pywt_delta, rel_error
from trainer_toys import ToyDenoiser, toy_data, toy_denoise, toy_prefix, toy_settings

import waveft_core.plans as plans
import waveft_core.portable_ops as portable_ops
from trainer import train_waveft
from waveft_core import WaveFTLinear
from waveft_core.geometry import patch_layout
from waveft_core.portable_ops import PortablePlan, analyse, build_portable_plan, synthesise
from waveft_core.positions import sample_positions
from waveft_core.sparse_ops import SparsePlan
from waveft_core.wavelets import grid_geometry, synthesis_filters

CPU = torch.device("cpu")
CASES = [  # (out, in, p, wavelet): even and odd sizes, short and long filters, more coefficients than rows
    (64, 48, 100, "db1"),
    (33, 17, 60, "db4"),
    (40, 100, 300, "sym5"),
    (17, 9, 30, "coif3"),
    (70, 50, 200, "db20"),
    (1, 9, 3, "sym3"),
]


@pytest.mark.parametrize("wavelet", ["haar", "db3", "sym6", "coif2", "db20", "dmey"])
@pytest.mark.parametrize("n", [16, 23])
def test_synthesise_is_pywt_idwt_with_zero_boundary(wavelet, n):
    half = grid_geometry(n, n, wavelet).half_rows
    coefficients = np.random.default_rng(0).standard_normal((3, 2 * half))
    ours = synthesise(torch.from_numpy(coefficients).float(), n, synthesis_filters(wavelet)[:, None, :])
    for row, (approx, detail) in enumerate(zip(coefficients[:, :half], coefficients[:, half:], strict=True)):
        expected = pywt.idwt(approx, detail, wavelet, mode="zero")[:n]
        np.testing.assert_allclose(ours[row].numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("wavelet", ["db1", "sym4", "coif5"])
def test_analyse_is_the_adjoint_of_synthesise(wavelet):
    """``<y S, x> = <y, x S^T>``: the gradient of synthesis is analysis."""
    n = 31
    half = grid_geometry(n, n, wavelet).half_rows
    filters = synthesis_filters(wavelet)[:, None, :]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, n, generator=generator), torch.randn(4, 2 * half, generator=generator)
    left = (synthesise(y, n, filters).double() * x.double()).sum()
    right = (y.double() * analyse(x, half, filters).double()).sum()
    assert abs(float(left - right)) <= 1e-5 * float(left.abs() + 1)


def _references(positions, shape, wavelet, coef, x, grad):
    dense = pywt_delta(coef, positions, shape, wavelet, 25.0)
    x64, g64 = x.double(), grad.double()
    layout = patch_layout(positions, shape, wavelet)
    return dense, x64 @ dense.T, g64 @ dense, coef_grad_from_weight_grad(g64.T @ x64, layout, wavelet, 25.0)


@pytest.mark.parametrize("out_features,in_features,p,wavelet", CASES)
def test_update_and_gradients_match_pywt(out_features, in_features, p, wavelet):
    shape = (out_features, in_features)
    positions = sample_positions(out_features, in_features, p, 777)
    generator = torch.Generator().manual_seed(2)
    coef = torch.randn(p, generator=generator)
    x, grad = torch.randn(70, in_features, generator=generator), torch.randn(70, out_features, generator=generator)
    dense, forward, grad_x, grad_coef = _references(positions, shape, wavelet, coef, x, grad)
    plan = build_portable_plan(positions, shape, wavelet, CPU)
    assert rel_error(portable_ops.portable_dense_delta(coef, plan, 25.0), dense) <= 1e-5
    assert rel_error(portable_ops.portable_delta_forward(x, coef, plan, 25.0), forward) <= 1e-5
    got_coef, got_x = portable_ops.portable_delta_backward(grad, x, coef, plan, 25.0, input_grad=True)
    assert rel_error(got_x, grad_x) <= 1e-5 and rel_error(got_coef, grad_coef) <= 1e-5


def test_chunked_tokens_give_the_same_result(monkeypatch):
    positions = sample_positions(40, 24, 80, 777)
    plan = build_portable_plan(positions, (40, 24), "db2", CPU)
    generator = torch.Generator().manual_seed(4)
    x, grad, coef = (torch.randn(*size, generator=generator) for size in [(300, 24), (300, 40), (80,)])
    whole = portable_ops.portable_delta_forward(x, coef, plan, 25.0), *portable_ops.portable_delta_backward(
        grad, x, coef, plan, 25.0, True)
    monkeypatch.setattr(portable_ops, "CHUNK_ELEMENTS", 80 * 7)  # 7 tokens a chunk: 43 chunks, a short last one
    chunked = portable_ops.portable_delta_forward(x, coef, plan, 25.0), *portable_ops.portable_delta_backward(
        grad, x, coef, plan, 25.0, True)
    for a, b in zip(whole, chunked, strict=True):  # the coefficient gradient sums the tokens in another order
        assert rel_error(b, a) <= 1e-5


def test_probe_finds_the_cpu_kernels():
    assert plans.sparse_kernels_work(CPU)
    assert isinstance(plans.build(sample_positions(8, 8, 5, 1), (8, 8), "db1", CPU), SparsePlan)


def test_probe_falls_back_when_a_kernel_is_missing_or_wrong(monkeypatch, caplog):
    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::sparse_sampled_addmm' with arguments from the 'SparseCsrMPS' backend")

    probe = plans.sparse_kernels_work.__wrapped__  # the uncached probe
    with caplog.at_level(logging.INFO, logger="WaveFT"):
        monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
        assert not probe(CPU)
    assert "portable kernels" in caplog.text and "SparseCsrMPS" in caplog.text
    monkeypatch.setattr(torch.sparse, "sampled_addmm", lambda pattern, a, b, beta: pattern * 0)
    assert not probe(CPU)


@pytest.mark.parametrize("dtype,trainable", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_layer_on_portable_kernels_equals_the_sparse_kernels(dtype, trainable, monkeypatch):
    """Weight-side (float32 frozen), activation-side (trainable base) and half-precision paths alike."""

    def run() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(3)
        layer = WaveFTLinear(torch.nn.Linear(48, 40).to(dtype), 150, "db3")
        layer.base.requires_grad_(trainable)
        with torch.no_grad():
            layer.coef.normal_()
        x = torch.randn(2, 37, 48, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        return layer.plan(CPU), y, x.grad, layer.coef.grad

    sparse_plan, *sparse = run()
    monkeypatch.setattr(plans, "sparse_kernels_work", lambda device: False)
    portable_plan, *portable = run()
    assert isinstance(sparse_plan, SparsePlan) and isinstance(portable_plan, PortablePlan)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    for a, b in zip(portable, sparse, strict=True):
        assert rel_error(a, b) <= tolerance


def test_training_on_portable_kernels_matches_the_sparse_kernels(tmp_path, monkeypatch):
    def train(name: str) -> list[float]:
        model = ToyDenoiser()
        result = train_waveft(model, toy_denoise(model), toy_data(), toy_settings(steps=3),
                              name_to_prefix=toy_prefix, output_path=tmp_path / name)
        return result.losses

    sparse = train("sparse.safetensors")
    monkeypatch.setattr(plans, "sparse_kernels_work", lambda device: False)
    portable = train("portable.safetensors")
    np.testing.assert_allclose(portable, sparse, rtol=1e-4)
    assert (tmp_path / "portable.safetensors").is_file()


@pytest.mark.parametrize("portable", [True, False])
def test_the_update_stays_float32_maths_under_autocast(monkeypatch, portable):
    """Autocast would run convolutions and matrix products in bf16; both kernel families compute the update
    and its gradients in float32 whatever autocast says."""
    if portable:
        monkeypatch.setattr(plans, "sparse_kernels_work", lambda device: False)
    torch.manual_seed(6)
    layer = WaveFTLinear(torch.nn.Linear(48, 40), 150, "db3")
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(2, 37, 48, requires_grad=True)
    plan = layer.plan(CPU)
    assert isinstance(plan, PortablePlan if portable else SparsePlan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = plans.delta_forward(x.detach().reshape(-1, 48), layer.coef.detach(), plan, 25.0, torch.float32)
        grad_coef, grad_x = plans.delta_backward(
            torch.ones(74, 40), x.detach().reshape(-1, 48), layer.coef.detach(), plan, 25.0, True)
    dense = layer.delta_weight().double()
    x64 = x.detach().reshape(-1, 48).double()
    assert delta.dtype == torch.float32 and rel_error(delta, x64 @ dense.T) <= 1e-5
    assert rel_error(grad_x, torch.ones(74, 40, dtype=torch.float64) @ dense) <= 1e-5
    layout = patch_layout(layer.positions, layer.shape, "db3")
    assert rel_error(grad_coef, coef_grad_from_weight_grad(torch.ones(74, 40, dtype=torch.float64).T @ x64, layout, "db3", 25.0)) <= 1e-5


def test_waveft_kernels_pins_a_family_by_name(monkeypatch):
    """``WAVEFT_KERNELS`` forces a kernel family (tests and users pin it); an unknown name is a clear error."""
    import waveft_core.plans as plans
    from waveft_core.portable_ops import PortablePlan
    from waveft_core.sparse_ops import SparsePlan

    positions = torch.randperm(24 * 20)[:30]
    for name, kind in (("portable", PortablePlan), ("sparse", SparsePlan)):
        monkeypatch.setenv("WAVEFT_KERNELS", name)
        assert isinstance(plans.shared_plan(positions, (24, 20), "db2", torch.device("cpu")), kind)
    monkeypatch.setenv("WAVEFT_KERNELS", "fused")  # the layer evaluation; plans stay the device's family
    assert isinstance(plans.shared_plan(positions, (24, 20), "db2", torch.device("cpu")), SparsePlan)
    monkeypatch.setenv("WAVEFT_KERNELS", "fast")
    with pytest.raises(ValueError, match="WAVEFT_KERNELS='fast': choose one of sparse, portable, fused"):
        plans.build(positions, (24, 20), "db2", torch.device("cpu"))
    monkeypatch.setenv("WAVEFT_KERNELS", "sparse")
    monkeypatch.setattr(plans, "sparse_kernels_work", lambda device: False)
    with pytest.raises(ValueError, match="no working sparse CSR kernels"):
        plans.family(torch.device("cpu"))
