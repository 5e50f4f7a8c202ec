"""What the ``cluster`` and ``template`` passes share: the layer view of a Conv/Gemm/MatMul
with a constant weight, a writer for new weights, and the multiply counts of a layer.

Multiply counts, per image (one sample of the batch):

* ``multiplies_dense``: the layer's MACs (every weight times every input it meets);
* ``distinct_products``: the number of distinct (weight value, input element) pairs the
  layer multiplies -- what a reuse-lookup kernel computes when it forms, per input element,
  the products with the values that element meets and gathers them per output. For a Gemm
  ``sum_k |distinct nonzero values of input column k|`` (= codebook size x inputs when every
  column holds every shared value); for a Conv the same over the taps that touch each input
  pixel (border pixels meet fewer taps), counted exactly. Zero weights cost nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import all_names, set_provenance, unique_name

from ._toolkit import drop_replaced
from ._weight_layers import WeightLayer, select  # noqa: F401 - (select: the passes' entry)


def out_pixels(t: WeightLayer) -> int:
    """Output positions per image that each apply the whole weight."""
    L = t.L
    if L.kind == "conv":
        return int(np.prod(L.y_shape[2:]))
    if L.kind == "matmul" and L.y_shape and all(L.y_shape[1:-1]):
        return int(np.prod(L.y_shape[1:-1]))
    return 1


def multiplies_dense(t: WeightLayer) -> int:
    return int(out_pixels(t) * t.Wm.size)


def _touched(n_in: int, n_out: int, k: int, stride: int, dil: int, pad: int) -> np.ndarray:
    """[k, n_in] bool: tap i of the kernel touches input position x along one axis."""
    out = np.zeros((k, n_in), dtype=bool)
    o = np.arange(n_out)
    for i in range(k):
        x = o * stride + i * dil - pad
        out[i, x[(x >= 0) & (x < n_in)]] = True
    return out


def distinct_products(t: WeightLayer, Wm: np.ndarray, rows: np.ndarray | None = None) -> int:
    """Distinct (nonzero weight value, input element) pairs per image of the layer with the
    weight matrix ``Wm`` (only its output rows ``rows`` when given); see the module doc."""
    W = Wm if rows is None else Wm[rows]
    if W.size == 0:
        return 0
    L = t.L
    if L.kind != "conv":
        per_col = sum(len(np.unique(c[c != 0])) for c in W.T)
        return int(per_col * (out_pixels(t) if L.kind == "matmul" else 1))
    K, C, kh, kw = t.stored.shape
    W4 = W.reshape(len(W), C, kh, kw)
    H, Wd = L.x_shape[2], L.x_shape[3]
    OH, OW = L.y_shape[2], L.y_shape[3]
    pt, pl = L.pads[0], L.pads[1]
    th = _touched(H, OH, kh, L.strides[0], L.dils[0], pt)
    tw = _touched(Wd, OW, kw, L.strides[1], L.dils[1], pl)
    rsig, rcount = np.unique(th.T, axis=0, return_counts=True)   # row signatures [g, kh]
    csig, ccount = np.unique(tw.T, axis=0, return_counts=True)
    total = 0
    for rs, rn in zip(rsig, rcount):
        for cs, cn in zip(csig, ccount):
            if not rs.any() or not cs.any():
                continue
            sub = W4[:, :, rs][:, :, :, cs]                        # [K, C, r, c]
            per_c = sum(len(np.unique(v[v != 0])) for v in sub.transpose(1, 0, 2, 3)
                        .reshape(C, -1))
            total += int(rn * cn * per_c)
    return total


class Writer:
    """Writes new weights (and biases) into a model copy in place, so later captures see
    them; ``finish`` drops the initializers no node reads any more."""

    def __init__(self, m: onnx.ModelProto, pass_name: str):
        self.m = m
        self.pass_name = pass_name
        self.names = all_names(m)
        self.old: set[str] = set()

    def node(self, name: str):
        return next(n for n in self.m.graph.node if n.name == name)

    def _init(self, base: str, arr: np.ndarray) -> str:
        name = unique_name(self.names, base)
        self.m.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def set_input(self, node_name: str, pos: int, arr: np.ndarray, suffix: str,
                  changed: str, **prov) -> None:
        node = self.node(node_name)
        while len(node.input) <= pos:
            node.input.append("")
        if node.input[pos]:
            self.old.add(node.input[pos])
        base = node.input[pos] or f"{node_name}_bias"
        node.input[pos] = self._init(f"{base}_{suffix}", arr)
        set_provenance(node, self.pass_name, node.name, changed=changed, **prov)

    def finish(self) -> onnx.ModelProto:
        return drop_replaced(self.m, self.old)
