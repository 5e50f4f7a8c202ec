"""Seeded model zoo for tests and benchmarks.

    from edgec.models import zoo
    model = zoo.build("resnet18", seed=0, batch=1)      # onnx.ModelProto
    zoo.export("tiny_resnet", "out/tiny_resnet.onnx", seed=3)

Every model has one input ``input`` (NCHW float32) and one output ``logits``: [batch, classes]
for the classifiers, and for the dense-prediction models (``dense_names()``) a per-pixel map
[batch, channels, H, W] at the input's resolution -- the output keeps the name ``logits`` (for
``db_detector`` it is already a probability map, after a Sigmoid), and ``num_classes`` is its
channel count.

* ``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``: torchvision architectures with random
  weights (``torch.manual_seed(seed)``; never pretrained, nothing is downloaded), exported with
  the legacy TorchScript exporter (``dynamo=False``) at opset 13 from eval mode, so the exporter
  folds BatchNormalization into the convolutions. Input [batch, 3, 224, 224]. Exports are cached
  under ``$EDGEC_CACHE/zoo`` (default ``~/.cache/edgec/zoo``), keyed by name, seed, batch, image
  size and the torch / torchvision versions. Needs ``pip install -e .[models]`` plus torchvision
  (see ``TORCHVISION_INSTALL``).
* The broad zoo (``broad_names()``, issue 22: the models users bring, beyond the three edgec was
  tuned on), random weights, exported and cached like the above:

  - torchvision classifiers, input [batch, 3, 224, 224], logits [batch, 1000]: ``resnet50``,
    ``squeezenet1_1`` (Conv/Relu/MaxPool/Concat "fire" modules, no Gemm: a 1x1 conv classifier
    and GlobalAveragePool), ``googlenet`` (``aux_logits=False, init_weights=True``: one output
    in eval mode; inception blocks of Concat'ed branches, MaxPool with ceil_mode; its
    BatchNormalization statistics come from one training-mode pass over a seeded random
    2x3x224x224 batch, as for ``db_detector`` below: with the default statistics its tiny
    initial weights left logits that did not depend on the input; likewise for
    ``shufflenet_v2_x1_0``),
    ``densenet121`` (Concat-heavy dense blocks, BatchNormalization before Conv stays unfolded),
    ``shufflenet_v2_x1_0`` (channel shuffle: Reshape/Transpose/Reshape, channel split as
    Slice with Shape/Gather/Div arithmetic left in the graph, Concat; ReduceMean head),
    ``vgg16`` (large 3x3 convs, two 4096-wide Gemm, 138 M parameters, a 0.55 GB file),
    ``mobilenet_v3_large`` (depthwise convs, squeeze-excitation, HardSigmoid/hard-swish as
    HardSigmoid*Mul at opset 13), ``regnet_x_400mf`` (grouped 3x3 convs, residual Add),
    ``resnext50_32x4d`` (ResNet-50's bottlenecks with 3x3 convs in 32 groups of 4-32
    channels), ``regnet_y_400mf`` (grouped 3x3 convs of group width 8 with
    squeeze-excitation), ``convnext_tiny`` (7x7 depthwise convs, LayerNorm and Linear layers
    with GELU on channels-last maps between Transposes, layer scale). The
    exporter leaves Identity nodes in these graphs (equal initializers, such as the
    zero-initialised biases, deduplicated to one).
  - ``lraspp_mobilenet_v3_large``: torchvision.models.segmentation's LR-ASPP on a MobileNetV3
    backbone (``weights=None, weights_backbone=None``), wrapped to return its ``out`` tensor:
    logits [batch, 21, H, W] (21 VOC classes per pixel; two bilinear ``Resize`` whose sizes come
    from Shape/Slice/Concat in the graph, the last up to the input size). Input
    [batch, 3, 224, 224].
  - ``db_detector``: a DB-style text detector built here in torch, shaped like PP-OCRv4's mobile
    detector: a PP-LCNet-like backbone (3x3 stem, depthwise-separable blocks with 3x3 and 5x5
    depthwise convs, hard-swish, squeeze-excitation blocks in the deep stages; feature maps at
    strides 4, 8, 16, 32), an FPN neck (1x1 lateral convs, nearest 2x ``Resize`` top-down with
    Add, 3x3 smoothing convs, bilinear ``Resize`` of every level to stride 4 and ``Concat``),
    and a DB head (3x3 conv + BN + ReLU, ConvTranspose 2x2 stride 2 + BN + ReLU, ConvTranspose
    2x2 stride 2, Sigmoid): logits [batch, 1, H, W], a text probability map. Input
    [batch, 3, 640, 640]; ``image_size`` must be a multiple of 32. Its BatchNormalization
    statistics are those of one training-mode pass over a seeded random 2x3x640x640 batch (then
    eval mode), so activations stay O(1) and the map is not saturated at 0 or 1; the exporter
    folds BN into the convs but not into the ConvTranspose, so one BatchNormalization remains.

  - ``unet``: a U-Net (Ronneberger et al.) at an edge device's width, built here in torch:
    four 2x2 max-pool steps down (double 3x3 conv + BN + ReLU, widths 16-32-64-128-256) and
    four up (ConvTranspose 2x2 stride 2 halving the channels, ``Concat`` with the skip
    connection of the same level, double 3x3 conv), a 1x1 head: logits [batch, 2, H, W]
    (two classes per pixel). Input [batch, 3, 256, 256]; ``image_size`` must be a multiple
    of 16. BatchNormalization statistics as for ``db_detector`` (folded into the convs).

  ``seed`` fixes the weights (``torch.manual_seed``, the global torch RNG is left as it was).
  Needs torch (and torchvision, except ``db_detector`` and ``unet``, whose cache keys say
  ``tvnone``).
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
    "broad_names",
    "dense_names",
    "onnx_names",
    "input_shape",
    "output_shape",
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

# name -> (channels, default image size, classes; for a dense model its output channels)
_TORCHVISION = {
    "resnet18": (3, 224, 1000),
    "mobilenet_v2": (3, 224, 1000),
    "efficientnet_b0": (3, 224, 1000),
    # the broad zoo (issue 22)
    "resnet50": (3, 224, 1000),
    "squeezenet1_1": (3, 224, 1000),
    "googlenet": (3, 224, 1000),
    "densenet121": (3, 224, 1000),
    "shufflenet_v2_x1_0": (3, 224, 1000),
    "vgg16": (3, 224, 1000),
    "mobilenet_v3_large": (3, 224, 1000),
    "regnet_x_400mf": (3, 224, 1000),
    "resnext50_32x4d": (3, 224, 1000),
    "regnet_y_400mf": (3, 224, 1000),
    "convnext_tiny": (3, 224, 1000),
}
# Dense prediction (per-pixel output [batch, channels, H, W]), built with torch.
_DENSE = {
    "lraspp_mobilenet_v3_large": (3, 224, 21),
    "db_detector": (3, 640, 1),
    "unet": (3, 256, 2),
}
_TORCH = {**_TORCHVISION, **_DENSE}
_TORCH_ONLY = {"db_detector", "unet"}  # built here in torch, no torchvision
# torchvision constructor keyword arguments beyond weights=None
_TV_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
# BatchNorm statistics from a pass over seeded noise (see _calibrate_bn): GoogLeNet's
# init_weights (truncated normal, std 0.01) shrinks activations ~20x per conv, and with the
# default BN statistics its logits were the fc bias alone (input-independent to 1e-13).
# ShuffleNetV2 (default init, default statistics): logits moved by 5e-5 of their size between
# two random inputs.
_CALIBRATE_BN = {"googlenet", "shufflenet_v2_x1_0"}
_BROAD = ["resnet50", "squeezenet1_1", "googlenet", "densenet121", "shufflenet_v2_x1_0",
          "vgg16", "mobilenet_v3_large", "regnet_x_400mf", "resnext50_32x4d", "regnet_y_400mf",
          "convnext_tiny", "lraspp_mobilenet_v3_large", "db_detector", "unet"]
_ONNX = {
    "fashion_cnn": (1, 28, 10),
    "tiny_cnn": (3, 32, 10),
    "tiny_resnet": (8, 17, 10),
}
_SPECS = {**_TORCH, **_ONNX}


def names() -> list[str]:
    """All model names."""
    return list(_SPECS)


def torch_names() -> list[str]:
    """Models that need torch to build (all but ``db_detector`` and ``unet`` need torchvision
    too)."""
    return list(_TORCH)


def broad_names() -> list[str]:
    """The broad benchmark zoo (issue 22): eleven classifiers and three dense models."""
    return list(_BROAD)


def dense_names() -> list[str]:
    """Dense-prediction models: ``logits`` is a per-pixel map [batch, channels, H, W]."""
    return list(_DENSE)


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


def output_shape(name: str, batch: int | None = 1, image_size: int | None = None) -> list:
    """Shape of ``logits``: [batch, classes], or [batch, channels, H, W] for a dense model."""
    b = "batch" if batch is None else batch
    if name in _DENSE:
        _, c, h, w = input_shape(name, batch, image_size)
        return [b, num_classes(name), h, w]
    return [b, num_classes(name)]


def num_classes(name: str) -> int:
    """Classes of a classifier; for a dense model the channel count of its per-pixel output."""
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
    if name == "db_detector" and image_size is not None and image_size % 32:
        raise ValueError(f"db_detector needs an image size that is a multiple of 32, "
                         f"not {image_size}")
    if name == "unet" and image_size is not None and image_size % 16:
        raise ValueError(f"unet needs an image size that is a multiple of 16, not {image_size}")
    if name in _TORCH:
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


def _torch_module(name: str, torch, torchvision):
    """The eval-mode torch module of zoo model ``name`` (weights from the current RNG)."""
    if name == "db_detector":
        return _db_detector(torch)
    if name == "unet":
        return _unet(torch)
    if name == "lraspp_mobilenet_v3_large":
        from torchvision.models import segmentation

        net = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)

        class _Out(torch.nn.Module):  # the segmentation models return {"out": tensor}
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)["out"]

        return _Out(net).eval()
    model = getattr(torchvision.models, name)(weights=None, **_TV_KWARGS.get(name, {}))
    if name in _CALIBRATE_BN:
        return _calibrate_bn(torch, model, _SPECS[name][1])
    return model.eval()


def _build_torchvision(name, seed, batch, image_size) -> onnx.ModelProto:
    if name in _TORCH_ONLY:  # torch alone
        try:
            import torch
        except ImportError as e:
            raise _missing_torch(name, "torch", e) from e
        torchvision = None
    else:
        torch, torchvision = _torch_modules(name)
    size = image_size or _SPECS[name][1]
    tv_version = getattr(torchvision, "__version__", "unknown") if torchvision else "none"
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
        model = _torch_module(name, torch, torchvision)
    data = _export_torch(torch, model, batch, size)
    proto = onnx.load_from_string(data)
    if name in _DENSE and batch is None:
        # With a dynamic batch the exporter cannot tell that a Resize to a Shape-computed size
        # keeps the channels and the input's H x W ("Resizelogits_dim_1"); they are static.
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        for d, v in zip(dims[1:], output_shape(name, batch, size)[1:]):
            d.Clear()
            d.dim_value = v
        data = proto.SerializeToString()
    # Cache best-effort: write a temporary file and rename it, so readers never see half a file.
    tmp = cached.with_name(f".{key}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
    return proto


def _export_torch(torch, model, batch: int | None, size: int) -> bytes:
    """The serialized ONNX export of eval-mode ``model`` (input [batch, 3, size, size])."""
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
    return buf.getvalue()


def build_on_data(name: str, images: np.ndarray, labels: np.ndarray | None = None,
                  seed: int = 0, ridge: float = 1e-2) -> onnx.ModelProto:
    """Zoo classifier ``name`` (torchvision) with random weights made to depend on real
    ``images`` [N, 3, H, W], exported at batch 1. With plain random weights a classifier's
    top-1 is one class for every picture (MobileNetV2: logits input-independent to 1e-10), so
    agreement with the original measures nothing. Here the BatchNorm statistics come from one
    training-mode pass over the first 256 ``images``, and the last linear layer is replaced:
    with ``labels`` [N] by a ridge-regression probe onto ``labels.max() + 1`` classes fit on
    the images' features (random convolutional features, a trained head: top-1 as confident
    as a linear probe's), else rescaled so every logit has mean 0 and variance 1 over the
    images. Not cached."""
    if name not in _TORCHVISION or name in _DENSE:
        raise ValueError(f"build_on_data takes a torchvision classifier, not {name!r}")
    torch, torchvision = _torch_modules(name)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None, **_TV_KWARGS.get(name, {}))
        _bn_statistics(torch, model, x[:256])
        parent, attr, fc = [(p, n, c) for p in model.modules()
                            for n, c in p.named_children() if isinstance(c, torch.nn.Linear)][-1]
        feats = []
        hook = fc.register_forward_hook(lambda m, i, o: feats.append(i[0].clone()))
        logits = torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])
        hook.remove()
        f = torch.cat(feats).double()
        if labels is None:
            mean, std = logits.mean(0), logits.std(0).clamp_min(1e-12)
            fc.weight /= std[:, None]
            fc.bias.copy_((fc.bias - mean) / std)
        else:
            y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
            k = int(y.max()) + 1
            # one scale for all features (per-feature standardizing would blow up the
            # near-constant ones, and with them any rounding a compression adds)
            mu, sd = f.mean(0), (f - f.mean(0)).pow(2).mean().sqrt().clamp_min(1e-12)
            z = (f - mu) / sd
            t = torch.nn.functional.one_hot(y, k).double() - 1.0 / k
            w = torch.linalg.solve(z.T @ z + ridge * len(z) * torch.eye(z.shape[1],
                                                                        dtype=z.dtype), z.T @ t)
            head = torch.nn.Linear(f.shape[1], k)
            head.weight.copy_((w / sd).T.float())
            head.bias.copy_((1.0 / k - (mu / sd) @ w).float())
            setattr(parent, attr, head)
    return onnx.load_from_string(_export_torch(torch, model.eval(), 1, int(images.shape[-1])))

def _db_detector(torch):
    """DB-style text detector (PP-OCRv4 mobile detector's shape), eval mode; see the docstring."""
    nn, F = torch.nn, torch.nn.functional

    def cbn(cin, cout, k=1, stride=1, groups=1, act="hswish"):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act == "hswish":
            layers.append(nn.Hardswish())
        elif act == "relu":
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class SE(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.reduce = nn.Conv2d(c, c // r, 1)
            self.expand = nn.Conv2d(c // r, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            s = F.hardsigmoid(self.expand(F.relu(self.reduce(s))))
            return x * s

    class DepthSep(nn.Module):  # PP-LCNet block: depthwise kxk (+SE), then pointwise 1x1
        def __init__(self, cin, cout, k, stride, se):
            super().__init__()
            self.dw = cbn(cin, cin, k, stride, groups=cin)
            self.se = SE(cin) if se else nn.Identity()
            self.pw = cbn(cin, cout, 1)

        def forward(self, x):
            return self.pw(self.se(self.dw(x)))

    # (cin, cout, kernel, stride, se) per block; stages end at strides 4, 8, 16, 32
    stages = [
        [(16, 32, 3, 1, False), (32, 48, 3, 2, False), (48, 48, 3, 1, False)],
        [(48, 96, 3, 2, False), (96, 96, 3, 1, False)],
        [(96, 192, 3, 2, False), (192, 192, 5, 1, False), (192, 192, 5, 1, False),
         (192, 192, 5, 1, True)],
        [(192, 384, 5, 2, True), (384, 384, 5, 1, True)],
    ]
    neck = 96  # FPN width; every level is smoothed to neck // 4 channels before the Concat

    class DBDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbn(3, 16, 3, 2)
            self.stages = nn.ModuleList(nn.Sequential(*(DepthSep(*b) for b in st))
                                        for st in stages)
            widths = [st[-1][1] for st in stages]
            self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1, bias=False) for c in widths)
            self.smooth = nn.ModuleList(nn.Conv2d(neck, neck // 4, 3, padding=1, bias=False)
                                        for _ in widths)
            q = neck // 4
            self.head = nn.Sequential(
                nn.Conv2d(neck, q, 3, padding=1, bias=False), nn.BatchNorm2d(q), nn.ReLU(),
                nn.ConvTranspose2d(q, q, 2, 2), nn.BatchNorm2d(q), nn.ReLU(),
                nn.ConvTranspose2d(q, 1, 2, 2), nn.Sigmoid())

        def forward(self, x):
            x = self.stem(x)
            feats = []
            for st in self.stages:
                x = st(x)
                feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, feats)]
            for i in range(len(lat) - 2, -1, -1):  # top-down: nearest 2x upsampling + Add
                lat[i] = lat[i] + F.interpolate(lat[i + 1], scale_factor=2.0, mode="nearest")
            outs = [conv(t) for conv, t in zip(self.smooth, lat)]
            outs = [outs[0]] + [F.interpolate(o, scale_factor=float(2 ** i), mode="bilinear",
                                              align_corners=False)
                                for i, o in enumerate(outs[1:], 1)]
            return self.head(torch.cat(outs[::-1], dim=1))

    model = DBDetector()
    # Random affine parameters; statistics at the default size (statistics taken on small
    # images saturated the 640x640 map).
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    return _calibrate_bn(torch, model, 640)


def _unet(torch):
    """U-Net (Ronneberger et al.) at edge width, eval mode; see the module docstring."""
    nn = torch.nn

    def double(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    widths = [16, 32, 64, 128, 256]

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList(double(c, w) for c, w in zip([3] + widths[:-1], widths))
            self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, 2) for w in widths[:0:-1])
            self.dec = nn.ModuleList(double(w, w // 2) for w in widths[:0:-1])
            self.head = nn.Conv2d(widths[0], 2, 1)

        def forward(self, x):
            skips = []
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
                skips.append(x)
            for up, dec, skip in zip(self.up, self.dec, skips[-2::-1]):
                x = dec(torch.cat([skip, up(x)], dim=1))
            return self.head(x)

    return _calibrate_bn(torch, UNet(), 256)


def _calibrate_bn(torch, model, size: int):
    """Eval-mode ``model`` with BatchNorm statistics of one training-mode pass over a seeded
    (current RNG) random [2, 3, size, size] batch: every BN then normalises its input, so
    activations stay O(1) however the weights were initialised. ``size`` is fixed per model,
    so the weights do not depend on the export size."""
    return _bn_statistics(torch, model, torch.randn(2, 3, size, size))


def _bn_statistics(torch, model, x):
    """Eval-mode ``model`` whose BatchNorm statistics are those of one training-mode pass
    over the batch ``x``."""
    with torch.no_grad():
        bn_types = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
        for bn in (m for m in model.modules() if isinstance(m, bn_types)):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass sets the batch statistics
        model.train()
        model(x)
    return model.eval()


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
