"""Model zoo and Fashion-MNIST data (edgec.models)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgec.models import fashion_mnist, zoo

ort = pytest.importorskip("onnxruntime")

MODELS_DIR = Path(zoo.__file__).resolve().parent
ONNX_BUILDERS = ["tiny_cnn", "tiny_resnet"]


def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session(model).run(None, {zoo.INPUT_NAME: x})[0]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _dims(vi) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in vi.type.tensor_type.shape.dim]


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


# --------------------------------------------------------------------------- names


def test_names():
    assert set(zoo.names()) == {"resnet18", "mobilenet_v2", "efficientnet_b0", "fashion_cnn",
                                "tiny_cnn", "tiny_resnet", *zoo.broad_names()}
    assert set(zoo.torch_names()) | set(zoo.onnx_names()) == set(zoo.names())
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("resnet9000")
    with pytest.raises(ValueError):
        zoo.build("tiny_cnn", batch=0)


# --------------------------------------------------------------------------- pure-ONNX builders


@pytest.mark.parametrize("name", ONNX_BUILDERS)
def test_onnx_builder_valid_and_runs(name):
    model = zoo.build(name, seed=0)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [zoo.INPUT_NAME]
    assert [o.name for o in model.graph.output] == [zoo.OUTPUT_NAME]
    shape = zoo.input_shape(name)
    assert _dims(model.graph.input[0]) == shape
    x = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    y = _run(model, x)
    assert y.shape == (1, 10) and y.dtype == np.float32
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name", ONNX_BUILDERS)
def test_onnx_builder_deterministic_per_seed(name):
    a, b, c = zoo.build(name, seed=7), zoo.build(name, seed=7), zoo.build(name, seed=8)
    assert a.SerializeToString() == b.SerializeToString()
    wa, wc = _weights(a), _weights(c)
    assert wa.keys() == wc.keys()
    assert all(wa[k].shape == wc[k].shape for k in wa)
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)
    x = np.random.default_rng(0).standard_normal(zoo.input_shape(name)).astype(np.float32)
    ya, yb, yc = _run(a, x), _run(b, x), _run(c, x)
    np.testing.assert_array_equal(ya, yb)
    assert not np.allclose(ya, yc)


@pytest.mark.parametrize("name", ONNX_BUILDERS)
def test_onnx_builder_dynamic_batch(name):
    model = zoo.build(name, seed=1, batch=None)
    onnx.checker.check_model(model)
    assert _dims(model.graph.input[0])[0] == "batch"
    x = np.random.default_rng(1).standard_normal([3] + zoo.input_shape(name)[1:]).astype(np.float32)
    y = _run(model, x)
    assert y.shape == (3, 10)
    # each row equals the batch-1 model's answer for that image
    single = _session(zoo.build(name, seed=1, batch=1))
    for i in range(3):
        np.testing.assert_allclose(y[i:i + 1], single.run(None, {zoo.INPUT_NAME: x[i:i + 1]})[0],
                                   rtol=1e-5, atol=1e-5)


def test_tiny_cnn_structure():
    model = zoo.build("tiny_cnn")
    assert [n.op_type for n in model.graph.node] == [
        "Conv", "BatchNormalization", "Relu", "MaxPool", "Conv", "Relu",
        "GlobalAveragePool", "Flatten", "Gemm"]
    assert zoo.input_shape("tiny_cnn") == [1, 3, 32, 32]


def test_tiny_resnet_structure():
    model = zoo.build("tiny_resnet")
    assert zoo.input_shape("tiny_resnet") == [1, 8, 17, 17]
    assert {"Add", "Conv", "BatchNormalization", "GlobalAveragePool", "Gemm"} <= _ops(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
    w = _weights(model)
    groups = [(a["group"], w[n.input[1]].shape[0]) for a, n in zip(attrs, convs)]
    assert any(g == cout and g > 1 for g, cout in groups), "no depthwise conv"
    assert any(1 < g < cout for g, cout in groups), "no grouped conv"
    assert any(a["strides"] != [1, 1] for a in attrs), "no strided conv"
    assert any(p[:2] != p[2:] for p in (a["pads"] for a in attrs)), "no asymmetric padding"
    assert sum(n.op_type == "Add" for n in model.graph.node) >= 2


# --------------------------------------------------------------------------- Fashion-MNIST

needs_fmnist = pytest.mark.skipif(
    not fashion_mnist.available(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fashion_mnist_load():
    x, y = fashion_mnist.load("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert np.array_equal(np.bincount(y), np.full(10, 1000))
    raw, _ = fashion_mnist.load_raw("test")
    np.testing.assert_allclose(x[:, 0], (raw / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD,
                               rtol=1e-5, atol=1e-5)
    xs, ys = fashion_mnist.load("test", n=5)
    assert xs.shape == (5, 1, 28, 28) and np.array_equal(ys, y[:5])


@needs_fmnist
def test_fashion_mnist_train_split():
    x, y = fashion_mnist.load("train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert 0 <= y.min() and y.max() <= 9
    # normalised with the training statistics
    assert abs(float(x.mean())) < 1e-2 and abs(float(x.std()) - 1) < 1e-2


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert not fashion_mnist.available()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load()
    with pytest.raises(ValueError):
        fashion_mnist.load("validation")


@needs_fmnist
def test_fashion_mnist_write_npz(tmp_path):
    path = fashion_mnist.write_npz(tmp_path / "fm.npz", n=16)
    with np.load(path) as d:
        assert sorted(d.files) == ["input", "labels"]
        assert d["input"].shape == (16, 1, 28, 28) and d["input"].dtype == np.float32
        assert d["labels"].dtype == np.int64
    other = fashion_mnist.write_npz(tmp_path / "fm.bin", n=2, input_name="x")
    assert other == tmp_path / "fm.bin" and other.is_file()
    with np.load(other) as d:
        assert sorted(d.files) == ["labels", "x"]


# --------------------------------------------------------------------------- fashion_cnn


def test_fashion_cnn_committed_files():
    onnx_path = MODELS_DIR / "fashion_mnist_cnn.onnx"
    meta = json.loads((MODELS_DIR / "fashion_mnist_cnn.json").read_text())
    data = onnx_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["onnx"]["sha256"]
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.opset_import[0].version == 13
    assert "BatchNormalization" in _ops(model)  # not folded by the exporter
    assert _dims(model.graph.input[0]) == ["batch", 1, 28, 28]
    assert meta["test_accuracy"] >= 0.88


def test_fashion_cnn_build_batch():
    m1 = zoo.build("fashion_cnn", batch=1)
    assert _dims(m1.graph.input[0]) == [1, 1, 28, 28]
    assert _dims(m1.graph.output[0]) == [1, 10]
    onnx.checker.check_model(m1)
    md = zoo.build("fashion_cnn", batch=None)
    assert _dims(md.graph.input[0])[0] == "batch"
    with pytest.raises(ValueError):
        zoo.build("fashion_cnn", image_size=32)


@needs_fmnist
def test_fashion_cnn_accuracy():
    x, y = fashion_mnist.load("test", n=2000)
    sess = _session(zoo.build("fashion_cnn", batch=None))
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0]
                             for i in range(0, len(x), 500)])
    assert logits.shape == (2000, 10)
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.88, acc


# --------------------------------------------------------------------------- torchvision zoo


def _require_torchvision():
    pytest.importorskip("torch")
    try:
        zoo._import_torchvision()
    except ImportError as e:
        pytest.skip(f"torchvision not importable: {e}")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torch_zoo_builds(name):
    _require_torchvision()
    model = zoo.build(name, seed=0, batch=1)
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 13
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _dims(model.graph.input[0]) == [1, 3, 224, 224]
    assert _dims(model.graph.output[0]) == [1, 1000]
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    y = _run(model, x)
    assert y.shape == (1, 1000) and np.all(np.isfinite(y))


@pytest.mark.torch
def test_torch_zoo_seed_cache_and_small_images():
    _require_torchvision()
    import torch

    before = torch.get_rng_state()
    a = zoo.build("resnet18", seed=1, batch=2, image_size=64)
    assert torch.equal(before, torch.get_rng_state()), "build must not touch the global torch RNG"
    files = list(zoo.cache_dir().glob("resnet18-seed1-batch2-64-*.onnx"))
    assert len(files) == 1
    b = zoo.build("resnet18", seed=1, batch=2, image_size=64)  # from the cache
    assert a.SerializeToString() == b.SerializeToString()
    c = zoo.build("resnet18", seed=2, batch=2, image_size=64)
    assert _dims(c.graph.input[0]) == [2, 3, 64, 64]
    wa, wc = _weights(a), _weights(c)
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa if k in wc)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert _run(a, x).shape == (2, 1000)


@pytest.mark.torch
@pytest.mark.slow  # ~23 s of training
def test_build_on_data_spreads_top1_over_the_classes():
    """Random weights, BatchNorm statistics and a ridge head fit on the images: the top-1 is
    no longer one class for every picture, and the head separates what it was fit on."""
    _require_torchvision()
    import torch

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = rng.standard_normal((120, 3, 32, 32)).astype(np.float32) * 0.5
    for k in range(3):  # class k: a bright band in row block k
        x[y == k, :, 10 * k:10 * k + 8, :] += 2.0
    before = torch.get_rng_state()
    m = zoo.build_on_data("resnet18", x, y)
    assert torch.equal(before, torch.get_rng_state())
    assert _dims(m.graph.input[0]) == [1, 3, 32, 32] and _dims(m.graph.output[0]) == [1, 3]
    top1 = np.array([_run(m, x[i:i + 1]).argmax() for i in range(len(x))])
    assert len(np.unique(top1)) == 3 and np.mean(top1 == y) > 0.9
    m2 = zoo.build_on_data("resnet18", x, y)
    assert m2.SerializeToString() == m.SerializeToString()
    plain = zoo.build_on_data("resnet18", x[:40])          # no labels: standardized logits
    logits = np.concatenate([_run(plain, x[i:i + 1]) for i in range(40)])
    assert logits.shape == (40, 1000) and len(np.unique(logits.argmax(1))) > 3
    with pytest.raises(ValueError, match="torchvision classifier"):
        zoo.build_on_data("tiny_cnn", x)


def test_torch_zoo_missing_torch_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[models\]") as info:
        zoo.build("mobilenet_v2")
    assert "torchvision==" in str(info.value)


def test_export_writes_single_file(tmp_path):
    path = zoo.export("tiny_resnet", tmp_path / "sub" / "tr.onnx", seed=3)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["tr.onnx"]
    assert (onnx.load(str(path)).SerializeToString()
            == zoo.build("tiny_resnet", seed=3).SerializeToString())
