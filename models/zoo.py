"""Seeded model zoo for tests and benchmarks.

    from edgec.models import zoo
    model = zoo.build("resnet18", seed=0, batch=1)      # onnx.ModelProto
    zoo.export("tiny_resnet", "out/tiny_resnet.onnx", seed=3)

Every model has one input ``input`` (NCHW float32) and one output ``logits`` [batch, classes].

* ``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``: torchvision architectures with random
  weights (``torch.manual_seed(seed)``; never pretrained, nothing is downloaded), exported with
  the legacy TorchScript exporter (``dynamo=False``) at opset 13 from eval mode, so the exporter
  folds BatchNormalization into the convolutions. Input [batch, 3, 224, 224]. Exports are cached
  under ``$EDGEC_CACHE/zoo`` (default ``~/.cache/edgec/zoo``), keyed by name, seed, batch, image
  size and the torch / torchvision versions. Needs ``pip install -e .[models]`` plus torchvision
  (see ``TORCHVISION_INSTALL``).
* ``fashion_cnn``: the trained Fashion-MNIST CNN committed beside this file
  (``fashion_mnist_cnn.onnx``, BatchNormalization not folded), input [batch, 1, 28, 28]
  normalised as in ``edgec.models.fashion_mnist``. ``seed`` is ignored (trained weights).
* ``tiny_cnn``, ``tiny_resnet``: pure-ONNX builders (onnx.helper + numpy ``default_rng(seed)``),
  no torch needed. ``tiny_cnn``: Conv+BN+Relu+MaxPool+Conv+Relu+GlobalAveragePool+Flatten+Gemm,
  input [1, 3, 32, 32], BN not folded. ``tiny_resnet``: Conv+BN stem, two residual blocks with
  Add (grouped conv, depthwise conv, strided conv with a strided 1x1 shortcut), an
  asymmetrically padded conv, input [1, 8, 17, 17].

``batch=None`` gives a dynamic batch axis named ``batch``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TORCHVISION_INSTALL",
    "names",
    "torch_names",
    "onnx_names",
    "input_shape",
    "num_classes",
    "build",
    "export",
    "cache_dir",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 13
# IR version 8 goes with opset 13..15 and is what every consumer of the zoo reads.
IR_VERSION = 8

# torchvision release built against torch 2.13.0 (its wheel Requires-Dist: torch==2.13.0).
TORCHVISION_VERSION = "0.28.0"
TORCHVISION_INSTALL = f"pip install --no-deps torchvision=={TORCHVISION_VERSION} pillow"

FASHION_ONNX = "fashion_mnist_cnn.onnx"

# name -> (channels, default image size, classes)
_TORCHVISION = {
    "resnet18": (3, 224, 1000),
    "mobilenet_v2": (3, 224, 1000),
    "efficientnet_b0": (3, 224, 1000),
}
_ONNX = {
    "fashion_cnn": (1, 28, 10),
    "tiny_cnn": (3, 32, 10),
    "tiny_resnet": (8, 17, 10),
}
_SPECS = {**_TORCHVISION, **_ONNX}


def names() -> list[str]:
    """All model names."""
    return list(_SPECS)


def torch_names() -> list[str]:
    """Models that need torch + torchvision to build."""
    return list(_TORCHVISION)


def onnx_names() -> list[str]:
    """Models that build without torch."""
    return list(_ONNX)


def _spec(name: str):
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(names())}") from None


def input_shape(name: str, batch: int | None = 1, image_size: int | None = None) -> list:
    """Input shape of ``build(name, batch=batch, image_size=image_size)`` ("batch" when dynamic)."""
    c, size, _ = _spec(name)
    size = image_size or size
    return ["batch" if batch is None else batch, c, size, size]


def num_classes(name: str) -> int:
    return _spec(name)[2]


def cache_dir() -> Path:
    """``$EDGEC_CACHE/zoo`` (default ``~/.cache/edgec/zoo``)."""
    root = os.environ.get("EDGEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgec")
    return Path(root) / "zoo"


def _check_batch(batch):
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None (dynamic), not {batch!r}")


def build(name: str, seed: int = 0, batch: int | None = 1,
          image_size: int | None = None) -> onnx.ModelProto:
    """Build zoo model ``name`` as an ``onnx.ModelProto`` (see the module docstring)."""
    _spec(name)
    _check_batch(batch)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, not {image_size!r}")
    if name in _TORCHVISION:
        return _build_torchvision(name, seed, batch, image_size)
    if name == "fashion_cnn":
        return _build_fashion(batch, image_size)
    if name == "tiny_cnn":
        return _tiny_cnn(seed, batch, image_size or 32)
    if name == "tiny_resnet":
        return _tiny_resnet(seed, batch, image_size or 17)
    raise AssertionError(name)  # pragma: no cover


def export(name: str, path, seed: int = 0, batch: int | None = 1,
           image_size: int | None = None) -> Path:
    """Write ``build(name, seed, batch, image_size)`` to ``path`` (one file, no external data)."""
    model = build(name, seed=seed, batch=batch, image_size=image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


# --------------------------------------------------------------------------- helpers


def _set_batch(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """Fix (or make dynamic) the leading axis of the graph inputs and outputs."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        d = dims[0]
        if batch is None:
            d.Clear()
            d.dim_param = "batch"
        else:
            d.Clear()
            d.dim_value = batch
    # Intermediate shapes may still carry the old batch axis; leave them to shape inference.
    del model.graph.value_info[:]
    return model


# --------------------------------------------------------------------------- fashion_cnn


def _fashion_path() -> Path:
    try:
        from importlib.resources import files

        p = files(__package__ or "edgec.models") / FASHION_ONNX
        if p.is_file():
            return Path(str(p))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent / FASHION_ONNX


def _build_fashion(batch, image_size) -> onnx.ModelProto:
    if image_size not in (None, 28):
        raise ValueError(f"fashion_cnn takes 28x28 images only, not {image_size}")
    path = _fashion_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; train it with "
            "`python -m edgec.models.train_fashion_mnist --out models/fashion_mnist_cnn.onnx`"
        )
    return _set_batch(onnx.load(str(path)), batch)


# --------------------------------------------------------------------------- torchvision


def _missing_torch(name: str, what: str, err: Exception) -> ImportError:
    return ImportError(
        f"zoo model {name!r} needs {what}, which is not importable ({err}). "
        f"Install the extra with `pip install -e .[models]` (torch), then torchvision with "
        f"`{TORCHVISION_INSTALL}` (--no-deps keeps pip from replacing the CPU torch)."
    )


def _import_torchvision():
    """Import torchvision, working around PyPI's CUDA build on a CPU-only torch.

    The CUDA wheel's C extension does not load against CPU torch, and then
    ``torchvision._meta_registrations`` fails with "operator torchvision::nms does not exist".
    The models do not need those ops, so the module is replaced by an empty stub.
    """
    mod = sys.modules.get("torchvision")
    if mod is not None:
        return mod
    try:
        import torchvision

        return torchvision
    except RuntimeError:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    meta = "torchvision._meta_registrations"
    sys.modules[meta] = types.ModuleType(meta)
    import torchvision

    return torchvision


def _torch_modules(name: str):
    try:
        import torch
    except ImportError as e:
        raise _missing_torch(name, "torch", e) from e
    try:
        torchvision = _import_torchvision()
    except ImportError as e:
        raise _missing_torch(name, f"torchvision=={TORCHVISION_VERSION}", e) from e
    return torch, torchvision


def _build_torchvision(name, seed, batch, image_size) -> onnx.ModelProto:
    torch, torchvision = _torch_modules(name)
    size = image_size or _SPECS[name][1]
    tv_version = getattr(torchvision, "__version__", "unknown")
    key = (
        f"{name}-seed{seed}-batch{'dyn' if batch is None else batch}-{size}"
        f"-torch{torch.__version__}-tv{tv_version}-opset{OPSET}"
    ).replace("+", "_").replace("/", "_")
    cached = cache_dir() / f"{key}.onnx"
    if cached.is_file():
        try:
            return onnx.load(str(cached))
        except Exception:  # noqa: BLE001 - a truncated or corrupt cache entry is rebuilt
            pass

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None).eval()
    dummy = torch.zeros(batch or 1, 3, size, size)
    dynamic = None if batch is not None else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            model, (dummy,), buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    data = buf.getvalue()
    proto = onnx.load_from_string(data)
    # Cache best-effort: write a temporary file and rename it, so readers never see half a file.
    tmp = cached.with_name(f".{key}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
    return proto


# --------------------------------------------------------------------------- pure ONNX


class _Builder:
    """Small helper collecting nodes and initializers with random weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None,
             output: str | None = None, **attrs) -> str:
        out = output or self._name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int | tuple = 3, stride: int = 1,
             pads=None, group: int = 1, bias: bool = True) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        if pads is None:
            pads = [kh // 2, kw // 2, kh // 2, kw // 2]
        fan_in = (cin // group) * kh * kw
        name = self._name("conv")
        w = (self.rng.standard_normal((cout, cin // group, kh, kw))
             * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self.const(f"{name}.weight", w)]
        if bias:
            b = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
            inputs.append(self.const(f"{name}.bias", b))
        return self.node("Conv", inputs, output=name, kernel_shape=[kh, kw],
                         strides=[stride, stride], pads=list(pads), group=group,
                         dilations=[1, 1])

    def bn(self, x: str, c: int) -> str:
        name = self._name("bn")
        r = self.rng
        scale = r.uniform(0.5, 1.5, c).astype(np.float32)
        shift = (r.standard_normal(c) * 0.1).astype(np.float32)
        mean = (r.standard_normal(c) * 0.1).astype(np.float32)
        var = r.uniform(0.5, 2.0, c).astype(np.float32)
        ins = [x] + [self.const(f"{name}.{k}", v) for k, v in
                     (("scale", scale), ("bias", shift), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", ins, output=name, epsilon=1e-5, momentum=0.9)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def head(self, x: str, cin: int, classes: int) -> str:
        x = self.node("GlobalAveragePool", [x], prefix="gap")
        x = self.node("Flatten", [x], axis=1)
        name = self._name("fc")
        w = (self.rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
        b = (self.rng.standard_normal(classes) * 0.01).astype(np.float32)
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)]
        return self.node("Gemm", inputs, output=OUTPUT_NAME, alpha=1.0, beta=1.0, transB=1)

    def model(self, graph_name: str, in_shape: list, classes: int, batch) -> onnx.ModelProto:
        x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, in_shape)
        y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                          ["batch" if batch is None else batch, classes])
        graph = helper.make_graph(self.nodes, graph_name, [x], [y], initializer=self.inits)
        m = helper.make_model(graph, producer_name="edgec.models.zoo",
                              opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = IR_VERSION
        return m


def _tiny_cnn(seed: int, batch, size: int) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.conv(INPUT_NAME, 3, 8, 3)
    x = b.relu(b.bn(x, 8))
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.relu(b.conv(x, 8, 16, 3))
    b.head(x, 16, 10)
    return b.model("tiny_cnn", input_shape("tiny_cnn", batch, size), 10, batch)


def _tiny_resnet(seed: int, batch, size: int) -> onnx.ModelProto:
    b = _Builder(seed)
    # stem: 8 -> 16 channels, BN left for the fold pass
    s = b.relu(b.bn(b.conv(INPUT_NAME, 8, 16, 3, bias=False), 16))
    # block 1 (identity shortcut): grouped 3x3 conv, then depthwise 3x3 conv
    y = b.relu(b.conv(s, 16, 16, 3, group=4))
    y = b.conv(y, 16, 16, 3, group=16)
    s = b.relu(b.add(y, s))
    # block 2 (downsampling): strided 3x3 conv + 1x1 conv, strided 1x1 projection shortcut
    y = b.relu(b.conv(s, 16, 32, 3, stride=2))
    y = b.conv(y, 32, 32, 1)
    p = b.conv(s, 16, 32, 1, stride=2, bias=False)
    s = b.relu(b.add(y, p))
    # asymmetric padding (top 1, left 0, bottom 1, right 2) keeps H and W; residual Add
    y = b.conv(s, 32, 32, 3, pads=[1, 0, 1, 2])
    s = b.relu(b.add(y, s))
    b.head(s, 32, 10)
    return b.model("tiny_resnet", input_shape("tiny_resnet", batch, size), 10, batch)
