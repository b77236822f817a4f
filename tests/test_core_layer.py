"""WaveFTLinear and attach/detach: outputs and gradients equal the dense formula, on both code paths."""

from __future__ import annotations

import pytest
import torch
from oracles import rel_error

from waveft_core import (
    WaveFTConfig,
    WaveFTLinear,
    attach_waveft,
    delta_weight,
    detach_waveft,
    export_layers,
    proportional_budgets,
)

CASES = [  # (out, in, n, wavelet, weight dtype, base trainable) -- the last two pick the code path
    (64, 48, 100, "db1", torch.float32, False),  # merged weight
    (33, 17, 60, "db4", torch.float32, False),
    (1, 9, 3, "sym3", torch.float32, False),
    (64, 48, 100, "db1", torch.float32, True),  # activation side (base trainable)
    (33, 17, 60, "coif2", torch.float64, True),
    (640, 640, 2592, "db1", torch.float32, False),
]


def _dense_reference(layer: WaveFTLinear, x: torch.Tensor, grad: torch.Tensor):
    coef = layer.coef.detach().double().requires_grad_(True)
    positions, shape = layer.positions, layer.shape
    # dW is linear in coef: dW = sum_k coef_k * dW(e_k) -- built densely, float64, with autograd.
    basis = torch.stack([delta_weight(torch.eye(coef.numel())[k], positions, shape, layer.wavelet, layer.scaling)
                         for k in range(coef.numel())]).double() if coef.numel() <= 100 else None
    if basis is None:
        dense = delta_weight(layer.coef.detach(), positions, shape, layer.wavelet, layer.scaling).double()
        x64 = x.detach().double().requires_grad_(True)
        y = x64 @ (layer.base.weight.double() + dense).T + layer.base.bias.double()
        y.backward(grad.double())
        grad_w = grad.double().reshape(-1, shape[0]).T @ x.detach().double().reshape(-1, shape[1])
        from oracles import coef_grad_from_weight_grad

        from waveft_core.geometry import patch_layout
        layout = patch_layout(positions, shape, layer.wavelet)
        return y, x64.grad, coef_grad_from_weight_grad(grad_w, layout, layer.wavelet, layer.scaling)
    x64 = x.detach().double().requires_grad_(True)
    dense = torch.einsum("k,koi->oi", coef, basis)
    y = x64 @ (layer.base.weight.double() + dense).T + layer.base.bias.double()
    y.backward(grad.double())
    return y, x64.grad, coef.grad


@pytest.mark.parametrize("out_features,in_features,n,wavelet,dtype,trainable", CASES)
def test_output_and_gradients_match_dense(out_features, in_features, n, wavelet, dtype, trainable):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features).to(dtype)
    layer = WaveFTLinear(base, n, wavelet)
    base.requires_grad_(trainable)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(3, 5, in_features, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = _dense_reference(layer, x, grad)
    assert rel_error(y, y_ref) <= 1e-5
    assert rel_error(x.grad, gx_ref) <= 1e-5
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-5


@pytest.mark.parametrize("inference_weights", [False, True])
def test_base_weight_is_bit_identical_after_training_steps(inference_weights):
    """The weight-side path patches W in place and must restore it exactly (inference tensors get a copy)."""
    torch.manual_seed(0)
    with torch.inference_mode(inference_weights):
        base = torch.nn.Linear(48, 64)
    original = base.weight.detach().clone()
    layer = WaveFTLinear(base, 300, "db2")
    optimizer = torch.optim.SGD([layer.coef], lr=0.1)
    for _ in range(3):
        x = torch.randn(5, 48, requires_grad=True)
        layer(x).pow(2).sum().backward()
        optimizer.step()
    assert layer.coef.abs().sum() > 0
    assert torch.equal(base.weight.detach(), original)


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 19])
def test_token_chunking_matches_dense(monkeypatch, trainable, chunk_elements):
    """Long sequences run in chunks of 64-token blocks plus a partial block; results must not change.

    300 tokens. ``CHUNK_ELEMENTS = 1``: one 64-token block per chunk, four times, then the 44-token rest;
    the default: four blocks in one block-diagonal call, then the rest.
    """
    import waveft_core.sparse_ops as sparse_ops

    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMENTS", chunk_elements)
    chunks = sparse_ops.token_chunks(300, WaveFTLinear(torch.nn.Linear(40, 24), 80, "db2").plan(torch.device("cpu")))
    assert [(c.blocks, c.block) for c in chunks] == ([(1, 64)] * 4 if chunk_elements == 1 else [(4, 64)]) + [(1, 44)]
    torch.manual_seed(1)
    base = torch.nn.Linear(40, 24)
    layer = WaveFTLinear(base, 80, "db2")
    base.requires_grad_(trainable)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(2, 150, 40, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, gx_ref, gc_ref = _dense_reference(layer, x, grad)
    assert rel_error(y, y_ref) <= 1e-5 and rel_error(x.grad, gx_ref) <= 1e-5
    assert rel_error(layer.coef.grad, gc_ref) <= 1e-5


def test_gpu_chunks_are_large():
    """On a GPU each chunk is a dozen kernel launches: a 1024 px SDXL layer is one chunk there, many on CPU."""
    import waveft_core.sparse_ops as sparse_ops

    plan = WaveFTLinear(torch.nn.Linear(640, 640), 2592).plan(torch.device("cpu"))
    assert [(c.blocks, c.block) for c in sparse_ops.token_chunks(4096, plan, torch.device("cuda"))] == [(64, 64)]
    assert len(sparse_ops.token_chunks(4096, plan, torch.device("cpu"))) == 6


def test_zero_init_is_a_no_op_and_base_is_frozen():
    base = torch.nn.Linear(12, 10)
    layer = WaveFTLinear(base, 20)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["coef"]


def test_half_precision_output_is_exact_up_to_output_rounding():
    """bf16 weights: the update is computed in float32 from the activations, so the only error left is the
    final rounding of the output to bf16 (merging into a bf16 ``W + dW`` would lose small updates)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64).to(torch.bfloat16)
    layer = WaveFTLinear(base, 200, scaling=0.05)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    exact = x.float() @ (base.weight.float() + layer.delta_weight()).T + base.bias.float()
    error = (layer(x).float() - exact).abs()
    assert error.max() <= exact.abs().max() * 2**-7


def test_strength_scales_update():
    base = torch.nn.Linear(16, 8)
    layer = WaveFTLinear(base, 30)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(2, 16)
    full = layer(x) - base(x)
    layer.strength = -0.5
    torch.testing.assert_close(layer(x) - base(x), -0.5 * full, rtol=1e-5, atol=1e-6)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 8), "to_k": torch.nn.Linear(8, 8)})
        self.ff = torch.nn.Linear(8, 16)


def test_attach_detach_restores_model_exactly():
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = attach_waveft(model, WaveFTConfig(n_frequency=5, target_pattern=r"attn1\.to_[qk]$"))
    assert sorted(layers) == ["attn1.to_k", "attn1.to_q"]
    assert isinstance(model.attn1["to_q"], WaveFTLinear) and isinstance(model.ff, torch.nn.Linear)
    exported = export_layers(model)
    assert exported["attn1.to_q"].seed == 777 and exported["attn1.to_q"].positions is None
    assert detach_waveft(model) == 2
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attach_with_no_match_leaves_model_untouched():
    model = _Tiny()
    with pytest.raises(ValueError, match="no layer matches"):
        attach_waveft(model, WaveFTConfig(target_pattern="nothing_here"))
    assert isinstance(model.attn1["to_q"], torch.nn.Linear)


@pytest.mark.parametrize("total", [3, 7, 100, 255, 64 + 64 + 128])
def test_total_budget_is_exact(total):
    shapes = {"a": (8, 8), "b": (8, 8), "c": (16, 8)}
    budgets = proportional_budgets(shapes, total)
    assert sum(budgets.values()) == total
    assert all(1 <= budgets[n] <= shapes[n][0] * shapes[n][1] for n in shapes)


@pytest.mark.parametrize("total,message", [(2, "smaller than the number"), (257, "exceeds")])
def test_total_budget_out_of_range(total, message):
    with pytest.raises(ValueError, match=message):
        proportional_budgets({"a": (8, 8), "b": (8, 8), "c": (16, 8)}, total)


def test_budget_overrides_and_validation():
    config = WaveFTConfig(n_frequency=10, n_frequency_pattern={r"\.ff$": 3})
    assert config.budgets({"x.attn": (4, 4), "x.ff": (4, 4)}) == {"x.attn": 10, "x.ff": 3}
    with pytest.raises(ValueError, match="exceeds"):
        WaveFTConfig(n_frequency=17).budgets({"tiny": (4, 4)})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"wavelet": "bior1.3"}, "allowed are haar"),
        ({"n_frequency": 0}, "positive integer"),
        ({"scaling": float("nan")}, "finite"),
        ({"seed": -1}, "non-negative"),
        ({"target_pattern": "("}, "regular expression"),
        ({"total_budget": 0}, "positive integer"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WaveFTConfig(**kwargs)


@pytest.mark.filterwarnings("ignore:torch.is_autocast_cpu_enabled:DeprecationWarning")
def test_autocast_check_works_on_torch_without_device_argument(monkeypatch):
    """A1111 1.10 ships torch 2.1, whose is_autocast_enabled() takes no device argument."""
    from waveft_core.layer import autocast_enabled

    def old_api(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return False

    with monkeypatch.context() as patch:
        patch.setattr(torch, "is_autocast_enabled", old_api)
        assert not autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with monkeypatch.context() as patch:  # patched inside: torch's own autocast code uses the new API
            patch.setattr(torch, "is_autocast_enabled", old_api)
            assert autocast_enabled("cpu")


def test_autocast_output_dtype_is_the_linear_one():
    """Under autocast the layer returns what ``nn.Linear`` returns (bf16), not a float32-promoted sum: ops
    outside torch's autocast lists (SDPA on torch 2.1) refuse mixed q/k/v dtypes. Gradients still flow."""
    torch.manual_seed(0)
    layer = WaveFTLinear(torch.nn.Linear(32, 32), 40)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(3, 70, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, plain = layer(x), layer.base(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.coef.grad.abs().sum() > 0


def test_weights_stored_in_another_dtype_are_cast_like_a_manual_cast_layer():
    """Float32 activations through fp16-stored weights (ComfyUI's text encoders): the base output is what
    ``F.linear`` gives with the weight cast to float32, plus the update; the stored weight stays fp16."""
    torch.manual_seed(0)
    layer = WaveFTLinear(torch.nn.Linear(24, 16).half(), 30, "db2")
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(5, 24, requires_grad=True)
    y = layer(x)
    weight, bias = layer.base.weight.float(), layer.base.bias.float()
    expected = x @ (weight + layer.delta_weight()).T + bias
    assert y.dtype == torch.float32 and layer.base.weight.dtype == torch.float16
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and layer.coef.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "wavelet,tokens,patched", [("db1", 8, True), ("db8", 8, False), ("db8", 4096, True), ("db20", 4096, False)]
)
def test_patching_only_where_it_is_cheaper(wavelet, tokens, patched):
    """A long filter paints p L^2 weight entries (db8: 256 per coefficient): with few tokens the update goes
    through the activations instead, leaving W alone; Haar always patches; and never when the taps outnumber
    the weight's entries four times (db20: 1600 per coefficient). Both paths give the dense result."""
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 80)
    layer = WaveFTLinear(base, 100, wavelet)
    with torch.no_grad():
        layer.coef.normal_()
    x = torch.randn(tokens, 96, requires_grad=True)
    version = base.weight._version
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert (base.weight._version != version) == patched  # each patch and restore writes W in place
    y_ref, gx_ref, gc_ref = _dense_reference(layer, x, grad)
    assert rel_error(y, y_ref) <= 1e-5 and rel_error(x.grad, gx_ref) <= 1e-5 and rel_error(layer.coef.grad, gc_ref) <= 1e-5


def test_layers_with_the_same_positions_share_one_plan():
    """SDXL's 560 attention projections come in 4 shapes: one plan per shape, not per layer (per-layer plans
    took 4 GB for db4). The scatter index is built only when a weight is patched."""
    a, b = WaveFTLinear(torch.nn.Linear(48, 40), 60, "db4"), WaveFTLinear(torch.nn.Linear(48, 40), 60, "db4")
    other = WaveFTLinear(torch.nn.Linear(48, 40), 60, "db4", seed=1)
    cpu = torch.device("cpu")
    assert a.plan(cpu) is b.plan(cpu) and other.plan(cpu) is not a.plan(cpu)
    assert "patches" not in vars(other.plan(cpu))  # functools.cached_property stores it on first use
    other.base.requires_grad_(True)  # activation side only
    other(torch.randn(3, 48)).sum().backward()
    assert "patches" not in vars(other.plan(cpu))


def test_clear_caches_drops_shared_plans_and_indices_for_a_device():
    """What hosts call when they unload a model: nothing WaveFT built for it stays cached."""
    from waveft_core import LayerAdapter, clear_caches, plans
    from waveft_core.plans import seeded_patch_index as _seeded_patch_index

    layer = LayerAdapter(torch.randn(20), (32, 24), 25.0, "db2", seed=3)
    layer.add_to_(torch.zeros(32, 24), 1.0)
    layer.activation_delta(torch.randn(2, 24))
    assert _seeded_patch_index.cache_info().currsize > 0 and any(k[2] == torch.device("cpu") for k in plans._SHARED_PLANS)
    clear_caches("cpu")
    assert _seeded_patch_index.cache_info().currsize == 0
    assert not any(k[2] == torch.device("cpu") for k in plans._SHARED_PLANS)
