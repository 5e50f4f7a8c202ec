"""Zoo models compiled for x86 against onnxruntime, and the Fashion-MNIST demo end to end.

Tolerances, per model (float32, different summation orders):
* tiny_cnn, tiny_resnet, fashion_cnn: rtol 1e-4, atol 1e-4 * max|ref| (logits O(1-10));
* resnet18, mobilenet_v2, efficientnet_b0 (random weights, deep): rtol 1e-3,
  atol 1e-3 * max|ref|, and identical top-1.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compile_to
from edgec.models import fashion_mnist, zoo
from edgec.runtime import OrtSession, Session, run_batched

TOL = {"tiny_cnn": 1e-4, "tiny_resnet": 1e-4, "fashion_cnn": 1e-4, "resnet18": 1e-3,
       "mobilenet_v2": 1e-3, "efficientnet_b0": 1e-3}


def _check(name, batch, tmp_path, n=None):
    model = zoo.build(name, seed=0, batch=batch)
    compile_to(model, tmp_path / name)
    sess = Session(tmp_path / name)
    rng = np.random.default_rng(0)
    spec = sess.input_specs[0]
    rows = n or batch
    x = rng.standard_normal([rows] + spec["shape"][1:]).astype(np.float32)
    ref = run_batched(OrtSession(model), {spec["name"]: x}, batch)[0]
    got = run_batched(sess, {spec["name"]: x}, sess.batch)[0]
    tol = TOL[name]
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet", "fashion_cnn"])
def test_small_zoo(name, batch, tmp_path):
    _check(name, batch, tmp_path, n=6)


@pytest.mark.torch
@pytest.mark.parametrize("name,batch", [
    ("resnet18", 1),
    # ~20 s each: with the slow tests (CI runs -m slow too); the zoo bench compiles all
    pytest.param("mobilenet_v2", 2, marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", 1, marks=pytest.mark.slow)])
def test_torchvision_zoo(name, batch, tmp_path):
    pytest.importorskip("torch")
    _check(name, batch, tmp_path)


@pytest.mark.skipif(not fashion_mnist.available(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_demo_check(tmp_path):
    """The README's demo: compile the trained model, check it on 1000 real test images."""
    from edgec.driver.check import check

    src = zoo._fashion_path()
    compile_to(src, tmp_path / "fm", input_shapes={"input": (8, 1, 28, 28)})
    fashion_mnist.write_npz(tmp_path / "val.npz", n=1000)
    res = check(src, tmp_path / "fm", tmp_path / "val.npz", max_drop=0.0)
    assert res["ok"], res["failures"]
    assert res["accuracy"]["reference"] > 0.9
    assert res["top1_agreement"] == 1.0
