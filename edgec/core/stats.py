"""Model size and cost: parameters, multiply-accumulates, weight bytes.

MACs count the layers that dominate CNN time -- Conv, ConvTranspose, Gemm and MatMul -- from
static shapes:

* Conv:  N * K * prod(out_spatial) * (C / groups) * prod(kernel)   (grouped and depthwise exact)
* ConvTranspose: N * C * prod(in_spatial) * (K / groups) * prod(kernel)
* Gemm:  M * N * K
* MatMul: prod(batch dims) * M * N * K   (numpy broadcasting)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import attr, value_shapes


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    bytes: int
    macs_by_op: dict

    def to_json(self) -> dict:
        return asdict(self)


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple]) -> int:
    """MACs of one node, 0 when it is not a counted op or its shapes are unknown."""
    op = node.op_type
    if op == "Conv":
        w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (_known(w) and _known(y)):
            return 0
        return int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not (_known(x) and _known(w)):
            return 0
        return int(np.prod(x)) * int(np.prod(w[1:]))
    if op == "Gemm":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not (_known(a) and _known(b)):
            return 0
        m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if attr(node, "transB", 0) else b[1]
        return m * n * k
    if op == "MatMul":
        a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (_known(a) and _known(b) and _known(y)):
            return 0
        k = a[-1]
        return int(np.prod(y)) * k
    return 0


def model_stats(model: onnx.ModelProto) -> ModelStats:
    params = 0
    nbytes = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        params += n
        try:
            nbytes += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:  # noqa: BLE001
            pass
    # ConstantOfShape of a constant shape over the importer's 16 M-element limit stays a node,
    # but the library holds its result as a constant (VGG/AlexNet exports of big Gemm weights)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64).reshape(-1)
            if (shape < 0).any():
                continue
            n = int(np.prod(shape, dtype=object))
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dtype = value.data_type if value is not None else onnx.TensorProto.FLOAT
            params += n
            try:
                nbytes += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize
            except Exception:  # noqa: BLE001
                pass
    shapes = value_shapes(model)
    by_op: dict[str, int] = {}
    for node in model.graph.node:
        m = node_macs(node, shapes)
        if m:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + m
    return ModelStats(params=params, macs=sum(by_op.values()), bytes=nbytes, macs_by_op=by_op)
