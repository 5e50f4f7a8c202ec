"""What the Fashion-MNIST tables share: the bundled CNN normalized as ``edgec compile`` does
(BatchNorm folded) at a batch of 500, its data, and top-1 accuracy over the test images."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500


def setup(n_calib: int):
    """``(model, x_test, y_test, x_calib)``: the normalized CNN (batch 500), the 10 000 test
    images and labels, the first ``n_calib`` training images."""
    from edgec.core.importer import load_model, normalize
    from edgec.driver.pipeline import NORMALIZE, Pipeline
    from edgec.models import fashion_mnist

    xt, yt = fashion_mnist.load("test")
    xc, _ = fashion_mnist.load("train", n_calib)
    model, _ = normalize(load_model(ROOT / "models" / "fashion_mnist_cnn.onnx"),
                         {"input": (BATCH, 1, 28, 28)})
    return Pipeline(NORMALIZE).run(model).model, xt, yt, xc


def accuracy(model, x, y, batch: int = BATCH, session=None) -> float:
    """Top-1 accuracy of ``model`` in onnxruntime (or of ``session``, anything with
    ``run(names, feeds)``) over ``x``, ``y`` in batches of ``batch``."""
    if session is None:
        from edgec.runtime import OrtSession

        session = OrtSession(model)
    hits = 0
    for i in range(0, len(x), batch):
        out = session.run(None, {"input": x[i:i + batch]})[0]
        hits += int((out.argmax(1) == y[i:i + batch]).sum())
    return hits / len(x)
