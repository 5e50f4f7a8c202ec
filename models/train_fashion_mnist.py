"""Train the small Fashion-MNIST CNN committed as ``models/fashion_mnist_cnn.onnx``.

    python -m edgec.models.train_fashion_mnist --out models/fashion_mnist_cnn.onnx

Deterministic CPU training (fixed seed, fixed thread count, deterministic algorithms):

    conv(1->32, 3x3, pad 1) + BN + ReLU
    conv(32->32)            + BN + ReLU
    maxpool 2
    conv(32->64)            + BN + ReLU
    conv(64->64)            + BN + ReLU
    maxpool 2
    flatten, Linear(64*7*7 -> 128) + ReLU, Dropout(0.3), Linear(128 -> 10)

The model is exported with the legacy TorchScript exporter (``dynamo=False``) at opset 13,
input ``input`` [batch, 1, 28, 28] (normalised as in ``fashion_mnist.normalize``), output
``logits`` [batch, 10], dynamic batch axis, BatchNormalization kept as separate nodes (the
compiler's BN-fold pass needs something to fold). A JSON file beside the ONNX records the
recipe, the training time and the onnxruntime accuracy on the 10k test images.

Needs the ``models`` extra (torch) and the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from . import fashion_mnist

ARCH = (
    "conv(1->32,3x3,p1)+BN+ReLU, conv(32->32)+BN+ReLU, maxpool2, "
    "conv(32->64)+BN+ReLU, conv(64->64)+BN+ReLU, maxpool2, flatten, "
    "Linear(3136->128)+ReLU, Dropout(0.3), Linear(128->10)"
)
OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "training needs torch: pip install -e .[models]"
        ) from e
    return torch


def build_model():
    torch = _torch()
    nn = torch.nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(128, 10),
    )


def _seed_everything(seed: int, threads: int) -> None:
    torch = _torch()
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _accuracy_torch(model, x, y, batch=1000) -> float:
    torch = _torch()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def onnx_accuracy(path, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of an ONNX classifier with onnxruntime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(images), batch):
        logits = sess.run(None, {name: images[i:i + batch]})[0]
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


def export_onnx(model, path) -> None:
    """Legacy exporter, opset 13, dynamic batch, BatchNormalization not folded into Conv."""
    import warnings

    torch = _torch()
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The model is in eval mode, so constant folding cannot alter trainable parameters.
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        # TrainingMode.PRESERVE on an eval-mode model exports inference-mode ops but skips the
        # eval peephole pass that would fold BatchNormalization into the preceding Conv.
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            external_data=False,
        )


def _check_onnx(path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(m)
    external = [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"{path}: initializers stored as external data: {external}")
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    if "BatchNormalization" not in ops:
        raise RuntimeError(f"{path}: BatchNormalization was folded by the exporter")
    return ops


def train(seed=0, epochs=5, batch_size=128, lr=2e-3, weight_decay=1e-4, threads=2, log=print):
    torch = _torch()
    _seed_everything(seed, threads)

    x_train, y_train = fashion_mnist.load("train")
    x_test, y_test = fashion_mnist.load("test")
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv, yv = torch.from_numpy(x_test), torch.from_numpy(y_test)

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, seen = 0.0, 0
        te = time.perf_counter()
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = xt[idx], yt[idx]
            # Random horizontal flip (clothes are left/right symmetric), from the seeded generator.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        acc = _accuracy_torch(model, xv, yv)
        rec = {
            "epoch": epoch + 1,
            "train_loss": round(total / seen, 5),
            "test_accuracy_torch": acc,
            "seconds": round(time.perf_counter() - te, 1),
        }
        history.append(rec)
        log(f"epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f}  "
            f"test acc {acc:.4f}  ({rec['seconds']} s)")
    train_seconds = time.perf_counter() - t0
    model.eval()
    return model, history, train_seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("fashion_mnist_cnn.onnx")),
                    help="ONNX path to write (a .json with the same stem is written beside it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch = _torch()
    if not fashion_mnist.available():
        # Raises the FileNotFoundError that names the apt package.
        fashion_mnist.load("train")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, history, train_seconds = train(
        seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, threads=args.threads,
    )
    export_onnx(model, out)
    ops = _check_onnx(out)

    x_test, y_test = fashion_mnist.load("test")
    acc = onnx_accuracy(out, x_test, y_test)
    data = out.read_bytes()
    meta = {
        "model": "fashion_mnist_cnn",
        "architecture": ARCH,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32",
                  "normalization": f"(pixel/255 - {fashion_mnist.MEAN}) / {fashion_mnist.STD}"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 10],
                   "classes": list(fashion_mnist.CLASSES)},
        "onnx": {"opset": OPSET, "exporter": "torch.onnx.export(dynamo=False, training=PRESERVE)",
                 "batchnorm_folded": False, "ops": ops, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()},
        "training": {
            "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
            "optimizer": f"AdamW(lr={args.lr}, weight_decay={args.weight_decay})",
            "schedule": "OneCycleLR(max_lr=lr)", "loss": "CrossEntropyLoss",
            "augmentation": "random horizontal flip (p=0.5)",
            "threads": args.threads, "deterministic": True, "device": "cpu",
            "seconds": round(train_seconds, 1), "history": history,
        },
        "test_accuracy": acc,
        "test_accuracy_note": "onnxruntime CPU, all 10000 Fashion-MNIST test images",
        "dataset": "Debian dataset-fashion-mnist",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({len(data)} bytes, sha256 {meta['onnx']['sha256'][:16]}...) "
          f"and {json_path}")
    print(f"onnxruntime test accuracy: {acc:.4f}; training took {train_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
