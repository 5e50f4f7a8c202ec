"""The broad zoo (issue 22): more torchvision classifiers and three dense-prediction models.

Torch exports are slow, so the full-size exports are ``slow`` (``pytest -m slow
tests/test_zoo_broad.py``); the default suite builds one cheap model, ``db_detector`` at 64x64.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgec.models import zoo

ort = pytest.importorskip("onnxruntime")

CLASSIFIERS = ["resnet50", "squeezenet1_1", "googlenet", "densenet121", "shufflenet_v2_x1_0",
               "vgg16", "mobilenet_v3_large", "regnet_x_400mf", "resnext50_32x4d",
               "regnet_y_400mf", "convnext_tiny"]
DENSE = ["lraspp_mobilenet_v3_large", "db_detector", "unet"]


def _dims(vi) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in vi.type.tensor_type.shape.dim]


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    outs = sess.run(None, {zoo.INPUT_NAME: x})
    assert len(outs) == 1
    return outs[0]


def _require(name: str):
    pytest.importorskip("torch")
    if name not in ("db_detector", "unet"):
        try:
            zoo._import_torchvision()
        except ImportError as e:
            pytest.skip(f"torchvision not importable: {e}")


def _check(model: onnx.ModelProto, name: str, batch, size=None) -> np.ndarray:
    """Valid ONNX with the documented input and output, run in onnxruntime."""
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == zoo.OPSET
    assert [i.name for i in model.graph.input] == [zoo.INPUT_NAME]
    assert [o.name for o in model.graph.output] == [zoo.OUTPUT_NAME]
    assert _dims(model.graph.input[0]) == zoo.input_shape(name, batch, size)
    assert _dims(model.graph.output[0]) == zoo.output_shape(name, batch, size)
    shape = zoo.input_shape(name, batch, size)
    shape[0] = 2 if batch is None else batch
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = _run(model, x)
    out = zoo.output_shape(name, batch, size)
    out[0] = shape[0]
    assert list(y.shape) == out and np.all(np.isfinite(y))
    return y


# --------------------------------------------------------------------------- names, no torch


def test_broad_names_and_shapes():
    broad = zoo.broad_names()
    assert broad == CLASSIFIERS + DENSE
    assert set(broad) <= set(zoo.names()) and set(broad) <= set(zoo.torch_names())
    assert zoo.dense_names() == DENSE
    assert not set(broad) & set(zoo.onnx_names())
    for name in CLASSIFIERS:
        assert zoo.input_shape(name) == [1, 3, 224, 224]
        assert zoo.num_classes(name) == 1000
        assert zoo.output_shape(name, batch=4) == [4, 1000]
    # dense models: "classes" is the channel count of the per-pixel map
    assert zoo.num_classes("lraspp_mobilenet_v3_large") == 21
    assert zoo.output_shape("lraspp_mobilenet_v3_large") == [1, 21, 224, 224]
    assert zoo.input_shape("db_detector") == [1, 3, 640, 640]
    assert zoo.num_classes("db_detector") == 1
    assert zoo.output_shape("db_detector", None, 96) == ["batch", 1, 96, 96]
    assert zoo.output_shape("resnet18", None) == ["batch", 1000]
    with pytest.raises(ValueError, match="multiple of 32"):
        zoo.build("db_detector", image_size=100)
    assert zoo.input_shape("unet") == [1, 3, 256, 256]
    assert zoo.output_shape("unet", None, 96) == ["batch", 2, 96, 96]
    with pytest.raises(ValueError, match="multiple of 16"):
        zoo.build("unet", image_size=100)


def test_bench_model_names():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import zoo_bench
    finally:
        sys.path.pop(0)
    assert zoo_bench.model_names("broad") == zoo.broad_names()
    assert zoo_bench.model_names("resnet18,broad,resnet50") == ["resnet18"] + zoo.broad_names()
    assert zoo_bench.model_names("default") == zoo_bench.DEFAULT.split(",")
    with pytest.raises(SystemExit, match="unknown zoo model"):
        zoo_bench.model_names("broad,resnet9000")
    assert zoo_bench.geomean([2.0, 0.5, None]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the cheap one


@pytest.mark.torch
def test_db_detector_small():
    _require("db_detector")
    import torch

    before = torch.get_rng_state()
    model = zoo.build("db_detector", seed=0, batch=1, image_size=64)
    assert torch.equal(before, torch.get_rng_state()), "build must not touch the global torch RNG"
    y = _check(model, "db_detector", 1, 64)
    # a probability map that is not saturated (BN statistics calibrated, see the docstring)
    assert 0.0 < y.min() and y.max() < 1.0 and y.std() > 0.01
    ops = _ops(model)
    assert {"Conv", "ConvTranspose", "Resize", "Concat", "Sigmoid", "GlobalAveragePool",
            "HardSigmoid", "Mul", "Add"} <= ops
    modes = {a.s.decode() for n in model.graph.node if n.op_type == "Resize"
             for a in n.attribute if a.name == "mode"}
    assert modes == {"nearest", "linear"}
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)]
    kernels = {tuple(a.ints) for n in depthwise for a in n.attribute if a.name == "kernel_shape"}
    assert kernels == {(3, 3), (5, 5)}
    ct = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    for n in ct:
        at = {a.name: list(a.ints) for a in n.attribute if a.ints}
        assert at["kernel_shape"] == [2, 2] and at["strides"] == [2, 2]
    # seeded: the same seed gives the same weights, another seed others
    again = zoo.build("db_detector", seed=0, batch=1, image_size=64)
    assert again.SerializeToString() == model.SerializeToString()
    other = zoo.build("db_detector", seed=1, batch=1, image_size=64)
    assert other.SerializeToString() != model.SerializeToString()
    assert list(zoo.cache_dir().glob("db_detector-seed0-batch1-64-torch*-tvnone-opset13.onnx"))


# --------------------------------------------------------------------------- full size (slow)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", CLASSIFIERS + DENSE)
def test_broad_zoo_builds(name):
    _require(name)
    model = zoo.build(name, seed=0, batch=1)
    y = _check(model, name, 1)
    # random weights, but not degenerate: the output depends on the input (GoogLeNet's logits
    # were its fc bias alone before its BatchNorm statistics were calibrated)
    x2 = np.random.default_rng(1).standard_normal(zoo.input_shape(name)).astype(np.float32)
    assert np.abs(_run(model, x2) - y).max() > 1e-3 * np.abs(y).max()
    if name == "db_detector":
        assert y.shape == (1, 1, 640, 640) and 0.0 <= y.min() and y.max() <= 1.0
        assert "ConvTranspose" in _ops(model)
    elif name == "lraspp_mobilenet_v3_large":
        assert y.shape == (1, 21, 224, 224) and "Resize" in _ops(model)
    elif name == "unet":
        assert y.shape == (1, 2, 256, 256)
        assert {"ConvTranspose", "Concat", "MaxPool"} <= _ops(model)
    else:
        assert y.shape == (1, 1000)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", DENSE)
def test_dense_dynamic_batch(name):
    _require(name)
    size = 128 if name == "db_detector" else 96
    model = zoo.build(name, seed=2, batch=None, image_size=size)
    y = _check(model, name, None, size)
    single = zoo.build(name, seed=2, batch=1, image_size=size)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    np.testing.assert_allclose(y[1:], _run(single, x[1:]), rtol=1e-4, atol=1e-5)
