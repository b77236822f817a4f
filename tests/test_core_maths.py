"""waveft_core's maths against PyWavelets and PEFT, table-driven over wavelets, shapes and budgets."""

from __future__ import annotations

import pytest
import torch
from oracles import peft_delta, ptwt_delta, pywt_delta, rel_error

from waveft_core import add_delta_, delta_weight, sample_positions, supported_wavelets
from waveft_core.names import sdxl_attention_shapes
from waveft_core.positions import _cached_positions

TOLERANCE = 1e-5
SHAPES = [(64, 48), (33, 17), (1, 9), (7, 1), (2, 2), (96, 130)]
PEFT_RIGHT = [f"db{i}" for i in range(1, 11)] + [f"sym{i}" for i in range(2, 11)] + ["coif1", "coif2", "coif3"]


def _random_layer(shape, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    positions = sample_positions(shape[0], shape[1], n)
    return torch.randn(n, generator=generator), positions


def test_positions_match_peft_reference():
    flat = sample_positions(64, 48, 10, seed=777)
    assert (flat // 48).tolist() == [23, 36, 36, 61, 17, 10, 34, 39, 56, 44]
    assert (flat % 48).tolist() == [23, 16, 45, 32, 35, 36, 27, 32, 15, 46]


@pytest.mark.parametrize("shape,n,seed", [((64, 48), 100, 777), ((640, 2048), 2592, 1), ((5, 3), 15, 0)])
def test_positions_equal_torch_randperm(shape, n, seed):
    expected = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))[:n]
    assert torch.equal(sample_positions(*shape, n, seed), expected)


def test_positions_cached_per_shape():
    _cached_positions.cache_clear()
    for out_features, in_features in sdxl_attention_shapes().values():
        sample_positions(out_features, in_features, 2592)
    assert _cached_positions.cache_info().misses == 4  # SDXL attention has four distinct shapes


def test_cache_keeps_only_the_positions_not_the_permutation():
    _cached_positions.cache_clear()
    cached = _cached_positions(1280, 2048, 2592, 777)
    assert cached.untyped_storage().nbytes() == 2592 * 8


def test_cached_positions_cannot_be_corrupted_by_callers():
    first = sample_positions(8, 8, 5)
    first.zero_()
    assert not torch.equal(sample_positions(8, 8, 5), first)


@pytest.mark.parametrize("shape,n", [((4, 4), 0), ((4, 4), 17), ((0, 4), 1)])
def test_positions_reject_bad_budget(shape, n):
    with pytest.raises(ValueError, match="must"):
        sample_positions(*shape, n)


@pytest.mark.parametrize("wavelet", supported_wavelets())
def test_delta_weight_equals_pywavelets(wavelet):
    for shape in [(64, 48), (33, 17), (1, 9)]:
        coef, positions = _random_layer(shape, min(40, shape[0] * shape[1]))
        ours = delta_weight(coef, positions, shape, wavelet, 25.0)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
        assert rel_error(ours, pywt_delta(coef, positions, shape, wavelet, 25.0)) <= TOLERANCE


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db5", "sym4", "coif3", "db20"])
def test_delta_weight_equals_ptwt(wavelet):
    """A third, independent oracle: ptwt's torch waverec2 (DESIGN.md's definition of the update)."""
    for shape in [(64, 48), (33, 17), (2, 9)]:
        coef, positions = _random_layer(shape, min(40, shape[0] * shape[1]))
        ours = delta_weight(coef, positions, shape, wavelet, 25.0)
        assert rel_error(ours, ptwt_delta(coef, positions, shape, wavelet, 25.0)) <= TOLERANCE


@pytest.mark.parametrize("wavelet", PEFT_RIGHT)
@pytest.mark.parametrize("shape", SHAPES)
def test_delta_weight_equals_peft(wavelet, shape):
    coef, positions = _random_layer(shape, max(1, min(50, shape[0] * shape[1] // 2)))
    ours = delta_weight(coef, positions, shape, wavelet, 25.0)
    assert rel_error(ours, peft_delta(coef, positions, shape, wavelet, 25.0)) <= TOLERANCE


@pytest.mark.parametrize("shape", [(6, 5), (1, 3), (4, 1)])
def test_full_budget(shape):
    numel = shape[0] * shape[1]
    coef, positions = _random_layer(shape, numel)
    ours = delta_weight(coef, positions, shape, "db2", 3.0)
    assert rel_error(ours, pywt_delta(coef, positions, shape, "db2", 3.0)) <= TOLERANCE


@pytest.mark.parametrize("wavelet", ["db8", "sym10", "coif5", "db20"])
def test_long_filters_built_densely_match_pywavelets(wavelet):
    """Past ``dense_is_cheaper`` dW comes from the separable factors, not from painted taps: same IDWT."""
    from waveft_core.functional import dense_is_cheaper

    shape = (320, 256)
    coef, positions = _random_layer(shape, 600)
    assert dense_is_cheaper(600, wavelet, shape)
    ours = delta_weight(coef, positions, shape, wavelet, 25.0)
    assert rel_error(ours, pywt_delta(coef, positions, shape, wavelet, 25.0)) <= TOLERANCE
    painted = add_delta_(torch.zeros(shape), coef, positions, wavelet, 25.0)
    assert rel_error(ours, painted) <= TOLERANCE


def test_haar_block_formula():
    """db1 paints 2x2 blocks: dW[2k+a, 2l+b] = s/2 (cA + (-1)^a cH + (-1)^b cV + (-1)^(a+b) cD)."""
    shape, values = (4, 4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    positions = torch.tensor([0 * 4 + 0, 0 * 4 + 2, 2 * 4 + 0, 2 * 4 + 2])  # cA, cH, cV, cD at k = l = 0
    dw = delta_weight(values, positions, shape, "db1", 2.0)
    for a in (0, 1):
        for b in (0, 1):
            expected = 1.0 + (-1) ** a * 2.0 + (-1) ** b * 3.0 + (-1) ** (a + b) * 4.0
            assert dw[a, b].item() == pytest.approx(expected)
    assert dw[2:, :].abs().sum() == 0 and dw[:, 2:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wavelet", ["db1", "db4", "coif2"])
def test_add_delta_equals_dense_add(dtype, wavelet):
    shape, strength = (40, 26), -0.7
    coef, positions = _random_layer(shape, 120)
    weight = torch.randn(shape).to(dtype)
    expected = weight.clone()
    expected += strength * delta_weight(coef, positions, shape, wavelet, 25.0)
    add_delta_(weight, coef, positions, wavelet, 25.0, strength)
    assert weight.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-5)
    else:  # one rounding of (w + dW) per entry, as with the dense add
        assert (weight.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7


def test_add_delta_on_strided_view():
    storage = torch.zeros(30, 40)
    view = storage[:, ::2].t()  # (20, 30), non-contiguous
    coef, positions = _random_layer((20, 30), 50)
    add_delta_(view, coef, positions, "db3", 25.0)
    torch.testing.assert_close(storage[:, ::2].t(), delta_weight(coef, positions, (20, 30), "db3", 25.0))
    assert storage[:, 1::2].abs().sum() == 0


def test_add_delta_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        add_delta_(torch.zeros(3, 3, 3), torch.ones(1), torch.tensor([0]))
