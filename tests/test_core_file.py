"""Adapter file v1: round trip, and every kind of broken or hostile file rejected with the key named."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from waveft_core import AdapterFileError, LayerAdapter, add_delta_, layer_from_tensors, load_adapter, save_adapter
from waveft_core.adapter_file import MAX_WEIGHT_ELEMENTS

PREFIX = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _layer(**overrides) -> LayerAdapter:
    values = dict(coef=torch.randn(30), shape=(16, 12), scaling=25.0, wavelet="db2", seed=777)
    values.update(overrides)
    return LayerAdapter(**values)


def _tensors(**replace) -> dict[str, torch.Tensor]:
    tensors = _layer().tensors(PREFIX)
    for suffix, value in replace.items():
        key = f"{PREFIX}.{suffix}"
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return tensors


def _write(path: Path, tensors: dict[str, torch.Tensor], version: str | None = "1") -> Path:
    save_file(tensors, str(path), metadata={"waveft_version": version} if version else None)
    return path


def test_round_trip_keeps_dw(tmp_path):
    layers = {PREFIX: _layer(), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": _layer(
        positions=torch.randperm(16 * 12)[:30], seed=None, wavelet="sym4")}
    path = save_adapter(tmp_path / "subject.safetensors", layers, {"waveft_steps": "500"})
    loaded = load_adapter(path)
    assert sorted(loaded.layers) == sorted(layers)
    for prefix, layer in layers.items():
        torch.testing.assert_close(loaded.layers[prefix].delta_weight(), layer.delta_weight())
    meta = loaded.metadata
    assert meta["waveft_version"] == "1" and meta["ss_network_module"] == "waveft"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_output_name"] == "subject"
    assert meta["waveft_wavelet"] == "mixed" and meta["waveft_steps"] == "500"
    assert loaded.num_params == 60
    assert [p.name for p in tmp_path.iterdir()] == ["subject.safetensors"]  # no temporary left behind


def test_saved_file_is_readable_like_any_new_file(tmp_path):
    """mkstemp creates 0600 files; an adapter in a shared model folder must follow the umask instead."""
    import os

    umask = os.umask(0o022)
    try:
        path = save_adapter(tmp_path / "shared.safetensors", {PREFIX: _layer()})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import waveft_core.adapter_file as module

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path / "a.safetensors", {PREFIX: _layer()})
    assert list(tmp_path.iterdir()) == []


BAD_LAYERS = [
    ({"waveft_coef": torch.randn(30, dtype=torch.float64)}, "waveft_coef: expected torch.float32"),
    ({"waveft_coef": torch.full((30,), float("nan"))}, "NaN or Inf"),
    ({"waveft_coef": torch.tensor([1.0, float("inf")])}, "NaN or Inf"),
    ({"waveft_coef": torch.randn(16 * 12 + 1)}, "coefficients for a 16x12"),
    ({"waveft_shape": torch.tensor([16, 12, 1])}, "expected 2 values"),
    ({"waveft_shape": torch.tensor([-16, 12])}, "implausible weight shape"),
    ({"waveft_shape": torch.tensor([1 << 20, 1 << 20])}, "implausible weight shape"),
    ({"waveft_wavelet": torch.tensor(list(b"db99"), dtype=torch.uint8)}, "unknown wavelet"),
    ({"waveft_wavelet": torch.tensor([255, 254], dtype=torch.uint8)}, "waveft_wavelet"),
    ({"waveft_scale": torch.tensor(float("nan"))}, "waveft_scale: not finite"),
    ({"waveft_seed": None}, "exactly one of"),
    ({"waveft_pos": torch.arange(30)}, "exactly one of"),
    ({"waveft_seed": None, "waveft_pos": torch.arange(29)}, "29 positions for 30"),
    ({"waveft_seed": None, "waveft_pos": torch.tensor([0] * 30)}, "duplicated"),
    ({"waveft_seed": None, "waveft_pos": torch.arange(30) + 16 * 12 - 10}, "out of range"),
    ({"waveft_seed": torch.tensor(-3)}, "negative seed"),
    ({"waveft_coef": None}, "waveft_coef: missing"),
    ({"waveft_alpha": torch.tensor(1.0)}, "unknown WaveFT tensor"),
]


@pytest.mark.parametrize("replace,message", BAD_LAYERS)
def test_bad_layers_rejected_naming_the_key(tmp_path, replace, message):
    tensors = _tensors(**replace)
    suffixes = {key.rpartition(".")[2]: value for key, value in tensors.items()}
    with pytest.raises(AdapterFileError, match=message):
        layer_from_tensors(PREFIX, suffixes)
    with pytest.raises(AdapterFileError, match=PREFIX if "unknown WaveFT" not in message else "not a WaveFT"):
        load_adapter(_write(tmp_path / "bad.safetensors", tensors))


def test_hostile_shape_is_rejected_before_allocation(tmp_path):
    """A shape of 2^40 elements with a seed would make randperm allocate terabytes: refused up front."""
    tensors = _tensors(waveft_shape=torch.tensor([1 << 20, 1 << 20]))
    with pytest.raises(AdapterFileError, match="implausible"):
        load_adapter(_write(tmp_path / "huge.safetensors", tensors))
    assert MAX_WEIGHT_ELEMENTS < (1 << 40)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _raw_file(path: Path, header: bytes, body: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: _bytes(p, pickle.dumps({"a": 1})), "not a safetensors file"),
        (lambda p: _bytes(p, b"\x01\x02"), "truncated before the header"),
        (lambda p: _raw_file(p, b"{}", length=1 << 40), "header of"),
        (lambda p: _raw_file(p, b"not json"), "bad header"),
        (lambda p: _raw_file(p, b"[1, 2]"), "header is not an object"),
        (lambda p: _raw_file(p, json.dumps({f"{PREFIX}.waveft_coef": {"dtype": "F32", "shape": [30],
                                             "data_offsets": [0, 120]}}).encode(), b"\x00" * 10), "outside the file"),
    ],
)
def test_not_safetensors_or_truncated(tmp_path, make, message):
    path = make(tmp_path / "x.safetensors")
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(path)


def test_truncated_real_file(tmp_path):
    path = save_adapter(tmp_path / "ok.safetensors", {PREFIX: _layer()})
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(path)


@pytest.mark.parametrize("version,message", [(None, "waveft_version is None"), ("2", "waveft_version is '2'")])
def test_unknown_version(tmp_path, version, message):
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(_write(tmp_path / "v.safetensors", _tensors(), version=version))


def test_empty_and_foreign_tensors(tmp_path):
    with pytest.raises(AdapterFileError, match="no WaveFT layers"):
        load_adapter(_write(tmp_path / "empty.safetensors", {}))
    foreign = {**_tensors(), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)}
    with pytest.raises(AdapterFileError, match="lora_unet_x.lora_up.weight: not a WaveFT tensor"):
        load_adapter(_write(tmp_path / "mixed.safetensors", foreign))


def test_header_dtype_checked_before_reading(tmp_path):
    tensors = _tensors(waveft_shape=torch.tensor([16.0, 12.0]))
    with pytest.raises(AdapterFileError, match="waveft_shape: expected dtype I64"):
        load_adapter(_write(tmp_path / "f.safetensors", tensors))


def test_add_to_checks_model_shape():
    with pytest.raises(AdapterFileError, match=r"\(16, 12\) weight, the model's is \(12, 16\)"):
        _layer().add_to_(torch.zeros(12, 16))


def test_random_corruption_never_escapes_as_another_error(tmp_path):
    """Seeded byte flips and truncations anywhere in a valid file: loading either succeeds with a valid
    adapter or raises AdapterFileError -- never a bare safetensors/JSON/struct/torch error or a crash."""
    import random

    good = save_adapter(tmp_path / "good.safetensors", {PREFIX: _layer(), PREFIX + "_b": _layer(
        positions=torch.randperm(16 * 12)[:30], seed=None)}).read_bytes()
    rng = random.Random(1234)
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    outcomes = {"loaded": 0, "rejected": 0}
    for trial in range(1000):
        data = bytearray(good)
        if trial % 5 == 0:
            data = data[: rng.randrange(len(data))]
        else:  # half of the flips land in the JSON header, where parsing can go wrong in the most ways
            for _ in range(rng.randint(1, 4)):
                where = rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(len(data))
                data[where] = rng.randrange(256)
        path = tmp_path / f"m{trial}.safetensors"
        path.write_bytes(bytes(data))
        try:
            adapter = load_adapter(path)
        except AdapterFileError:
            outcomes["rejected"] += 1
        else:
            outcomes["loaded"] += 1
            for layer in adapter.layers.values():
                assert torch.isfinite(layer.delta_weight()).all()
    assert outcomes["rejected"] > 0 and outcomes["loaded"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("wavelet,dense", [("db2", False), ("db8", True), ("coif5", True)])
def test_add_to_is_the_same_update_by_scatter_or_dense(monkeypatch, wavelet, dense, dtype):
    """Long filters (taps over half the weight's entries) build dW densely from the separable factors, without
    the p L^2 tap index; the update is the same as painting the taps, rounded once."""
    import waveft_core.plans as plans

    built = []
    monkeypatch.setattr(plans, "patch_index", lambda *a: built.append(a) or _real_patch_index(*a))
    plans.seeded_patch_index.cache_clear()
    layer = _layer(coef=torch.randn(600) * 0.01, shape=(320, 256), wavelet=wavelet)
    weight = torch.randn(320, 256).to(dtype)
    painted = add_delta_(torch.zeros(320, 256), layer.coef, layer.flat_positions(), wavelet, 25.0 * 0.5)
    expected = (weight.float() + painted).to(dtype)
    got = layer.add_to_(weight.clone(), 0.5)
    assert bool(built) != dense
    torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


def _real_patch_index(*args):
    from waveft_core.geometry import patch_index

    return patch_index(*args)


# ------------------------------------------------------------------ hostile inputs, one class per test


@pytest.mark.parametrize("scaling,coef", [(1e38, 1.0), (25.0, 1e4), (-3e5, 0.1)])
def test_finite_inputs_with_an_unbounded_update_are_refused(tmp_path, scaling, coef):
    """Scale and coefficients each finite, their product not: it would write +-Inf into an fp16 model."""
    tensors = _tensors(waveft_scale=torch.tensor(scaling), waveft_coef=torch.full((30,), coef))
    with pytest.raises(AdapterFileError, match=r"waveft_scale: scaling x largest coefficient is .* beyond 10000"):
        load_adapter(_write(tmp_path / "big.safetensors", tensors))


def test_an_oversized_wavelet_name_is_refused_from_the_header(tmp_path):
    tensors = _tensors(waveft_wavelet=torch.zeros(1 << 20, dtype=torch.uint8))
    with pytest.raises(AdapterFileError, match="waveft_wavelet: implausible length 1048576"):
        load_adapter(_write(tmp_path / "long.safetensors", tensors))
    with pytest.raises(AdapterFileError, match="bytes is no wavelet name"):  # the stock loaders' path
        layer_from_tensors(PREFIX, {k.rpartition(".")[2]: v for k, v in tensors.items()})


def test_more_layers_than_any_model_has_are_refused_before_reading(tmp_path):
    from waveft_core.adapter_file import MAX_LAYERS

    entries = {f"lora_unet_l{i}.waveft_coef": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
               for i in range(MAX_LAYERS * 6 + 1)}
    path = _raw_file(tmp_path / "many.safetensors", json.dumps({**entries, "__metadata__": {"waveft_version": "1"}}).encode(), b"\x00" * 4)
    with pytest.raises(AdapterFileError, match=f"more than {MAX_LAYERS} layers"):
        load_adapter(path)


def test_a_deeply_nested_header_is_a_clear_error(tmp_path):
    path = _raw_file(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(AdapterFileError, match="bad header"):
        load_adapter(path)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    import os

    path = tmp_path / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading it never ends
    else:
        path.mkdir()
    with pytest.raises(AdapterFileError, match="not a regular file"):
        load_adapter(path)


def test_small_json_reader_refuses_devices_fifos_huge_and_deep_files(tmp_path):
    import os

    from waveft_core.adapter_file import read_small_json

    (tmp_path / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "huge.json").write_bytes(b" " * (2 << 20))
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    for name, message in [("zero", "not a regular file"), ("fifo", "not a regular file"),
                          ("huge", "too large"), ("deep", "RecursionError")]:
        with pytest.raises(AdapterFileError, match=message):
            read_small_json(tmp_path / f"{name}.json")


def test_applying_a_long_filter_layer_keeps_no_index_larger_than_the_weight(monkeypatch):
    """The memory bomb: coif17 on SDXL's largest Linear with a budget just under the old dense switch built a
    290 MB tap index per layer; what applying a layer keeps is now bounded by a float32 copy of its weight."""
    import waveft_core.adapter as adapter_module
    from waveft_core import filter_length
    from waveft_core.functional import INDEX_BYTES_PER_TAP, dense_is_cheaper

    shape = (10240, 1280)
    assert dense_is_cheaper(5600, "coif17", shape)  # the old rule painted this: 6.5 M taps, ~290 MB of index
    for p in (10, 100, 1000, 5000, 20000, 100000):
        for wavelet in ("db1", "db4", "db8", "sym10", "coif17"):
            painted = not dense_is_cheaper(p, wavelet, shape)
            index_bytes = p * filter_length(wavelet) ** 2 * INDEX_BYTES_PER_TAP
            assert not painted or index_bytes <= max(4 * shape[0] * shape[1], (1 << 16) * INDEX_BYTES_PER_TAP)
    assert not dense_is_cheaper(2592, "db1", (640, 640))  # the default keeps its bit-exact painting

    def no_index(*args, **kwargs):
        raise AssertionError("a dense-built layer must not build a tap index")

    monkeypatch.setattr(adapter_module, "seeded_patch_index", no_index)
    layer = LayerAdapter(torch.randn(5600) * 1e-3, (640, 640), 25.0, "coif17", seed=1)
    assert dense_is_cheaper(5600, "coif17", (640, 640))
    weight = torch.zeros(640, 640)
    layer.add_to_(weight, 1.0)
    assert torch.isfinite(weight).all() and weight.abs().sum() > 0


def _structured_mutation(rng, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One seeded change of a class a hostile file uses: values (NaN, Inf, huge, negative), dtypes, shapes and
    lengths, missing / extra / renamed keys, names with control characters, swapped seed and positions."""
    out = dict(tensors)
    key = rng.choice(sorted(out))
    kind = rng.randrange(9)
    if kind == 0:
        out[key] = torch.full_like(out[key], rng.choice([float("nan"), float("inf"), 1e38, -1e30])) \
            if out[key].is_floating_point() else out[key] * rng.choice([-1, 10**9, 0])
    elif kind == 1:
        out[key] = out[key].to(rng.choice([torch.float16, torch.bfloat16, torch.int32, torch.uint8, torch.float64]))
    elif kind == 2:
        out[key] = torch.zeros(rng.choice([0, 1, 3, 65, 1 << 16]), dtype=out[key].dtype)
    elif kind == 3:
        out.pop(key)
    elif kind == 4:
        out[key.rpartition(".")[0] + rng.choice([".lora_up.weight", ".waveft_extra", ".alpha"])] = torch.ones(2)
    elif kind == 5:
        out[key.replace("lora_unet_", rng.choice(["", "\x1b[31m", "lora_unet_\n", "a.b."]))] = out.pop(key)
    elif kind == 6:
        out[key] = out[key].reshape(-1, 1) if out[key].dim() == 1 else out[key].reshape(-1)
    elif kind == 7:
        prefix = key.rpartition(".")[0]
        out[f"{prefix}.waveft_pos"] = torch.randint(-5, 10**9, (30,))
    else:
        out[key] = torch.randn(rng.randrange(1, 200)).to(out[key].dtype)
    return out


def test_structured_mutations_give_a_valid_adapter_or_a_named_error_fast(tmp_path):
    """Seeded property test across the hostile-input classes: every mutated file either loads as a valid,
    bounded adapter or raises AdapterFileError naming the file; each in bounded time."""
    import random
    import time

    from waveft_core.adapter_file import MAX_UPDATE

    good = {**_layer().tensors(PREFIX), **_layer(positions=torch.randperm(16 * 12)[:30], seed=None).tensors(PREFIX + "_b")}
    rng = random.Random(2026)
    outcomes = {"loaded": 0, "rejected": 0}
    for trial in range(300):
        tensors = good
        for _ in range(rng.randint(1, 3)):
            tensors = _structured_mutation(rng, tensors)
        path = tmp_path / f"s{trial}.safetensors"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"waveft_version": "1"})
        except Exception:  # safetensors itself refuses some (empty names ...): not a file anyone could ship
            continue
        start = time.perf_counter()
        try:
            adapter = load_adapter(path)
        except AdapterFileError as err:
            outcomes["rejected"] += 1
            assert path.name in str(err), err
        else:
            outcomes["loaded"] += 1
            for layer in adapter.layers.values():
                assert abs(layer.scaling) * float(layer.coef.abs().max()) <= MAX_UPDATE
                assert torch.isfinite(layer.delta_weight()).all()
        assert time.perf_counter() - start < 5.0, trial
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():  # the stock loaders' way: bare tensors, one layer at a time
            prefix, _, suffix = key.rpartition(".")
            if suffix.startswith("waveft_"):
                groups.setdefault(prefix, {})[suffix] = value
        for prefix, group in groups.items():
            try:
                layer = layer_from_tensors(prefix, group)
            except AdapterFileError:
                continue
            assert torch.isfinite(layer.delta_weight()).all()
    assert outcomes["rejected"] > 100 and outcomes["loaded"] > 0, outcomes
