"""What every pass needs besides its own algebra: graph edits, union-find, tensor types,
calibration batching.

Graph edits work in place on a model the pass already copied (:func:`edgec.passes.copy_model`);
each returns what it changed so a pass can report it. The chunked onnxruntime runs over
calibration data live in :mod:`._calib` and are re-exported here, so a pass imports one module.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ._calib import calib_rows, collect, fixed_batch, stream_activations  # noqa: F401

# ----------------------------------------------------------------------------- graph edits


def set_nodes(m: onnx.ModelProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Replace the graph's node list by ``nodes`` (in that order)."""
    nodes = list(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def set_initializers(m: onnx.ModelProto, inits: Iterable[onnx.TensorProto]) -> None:
    """Replace the graph's initializer list by ``inits`` (in that order)."""
    inits = list(inits)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)


def drop_unused_initializers(m: onnx.ModelProto) -> onnx.ModelProto:
    """Remove every initializer no node reads (in place); returns ``m``."""
    used = {i for n in m.graph.node for i in n.input}
    set_initializers(m, [t for t in m.graph.initializer if t.name in used])
    return m


def ancestors(node: onnx.NodeProto, producer: dict) -> set[str]:
    """Names of every node ``node`` reads from, directly or not (``producer``: tensor ->
    its producing node, as :func:`producers` gives)."""
    seen: set[str] = set()
    stack = [i for i in node.input if i in producer]
    while stack:
        p = producer[stack.pop()]
        if p.name in seen:
            continue
        seen.add(p.name)
        stack += [i for i in p.input if i in producer]
    return seen


def set_bias(node: onnx.NodeProto, name: str) -> None:
    """Make tensor ``name`` the bias (input 2) of a Conv / Gemm, dropping a Gemm's ``beta``
    (the new bias already holds it)."""
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    for a in list(node.attribute):
        if a.name == "beta":
            node.attribute.remove(a)


def drop_replaced(m: onnx.ModelProto, old: set[str]) -> onnx.ModelProto:
    """Remove the tensors of ``old`` (weights a pass replaced) that nothing reads any more:
    initializers, their graph-input entries and the Constant nodes producing them (in
    place); returns ``m``."""
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    gone = old - used
    set_initializers(m, [x for x in m.graph.initializer if x.name not in gone])
    keep_in = [x for x in m.graph.input if x.name not in gone]
    if len(keep_in) != len(m.graph.input):
        del m.graph.input[:]
        m.graph.input.extend(keep_in)
    nodes = [n for n in m.graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    if len(nodes) != len(m.graph.node):
        set_nodes(m, nodes)
    return m


def splice(m: onnx.ModelProto, new_nodes: dict[str, list[onnx.NodeProto]],
           new_inits: Iterable[onnx.TensorProto] = ()) -> None:
    """Put ``new_nodes[name]`` where the node ``name`` stands (in place), append
    ``new_inits`` and drop the initializers no node reads any more."""
    nodes = []
    for n in m.graph.node:
        nodes += new_nodes.get(n.name, [n])
    set_nodes(m, nodes)
    m.graph.initializer.extend(new_inits)
    drop_unused_initializers(m)


def rename_outputs(m: onnx.ModelProto, rename: dict[str, str]) -> None:
    """Nodes writing a tensor named in ``rename`` write its new name instead (in place)."""
    for n in m.graph.node:
        for i, o in enumerate(n.output):
            if o in rename:
                n.output[i] = rename[o]


def producers(m: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in m.graph.node for o in n.output}


def optional_input(node: onnx.NodeProto, i: int) -> str | None:
    """The node's ``i``-th input name, or None when it is absent or empty."""
    return node.input[i] if len(node.input) > i and node.input[i] else None


def report_removed(report, before: onnx.ModelProto, after: onnx.ModelProto, what: str) -> None:
    """One ``report.rewrite`` per node of ``before`` that ``after`` no longer holds."""
    ops = {n.name: n.op_type for n in before.graph.node}
    kept = {n.name for n in after.graph.node}
    for name, op in ops.items():
        if name not in kept:
            report.rewrite(name, what, op=op)


def elem_types(m: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known after shape inference (or before,
    when inference fails), initializers included."""
    from edgec.core.importer import infer_shapes

    try:
        mm = infer_shapes(m)
    except Exception:  # noqa: BLE001
        mm = m
    out = {}
    for vi in list(mm.graph.input) + list(mm.graph.value_info) + list(mm.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for t in mm.graph.initializer:
        out[t.name] = t.data_type
    return out


# ----------------------------------------------------------------------------- union-find


class UnionFind:
    """Disjoint sets over hashable items, created on first use.

    ``union(a, b)`` makes the root of ``a`` the root of both, unless ``prefer`` is given:
    then ``prefer(root_a, root_b)`` names the root that stays (``prefer=min``: the smallest)."""

    def __init__(self, prefer: Callable | None = None):
        self.parent: dict = {}
        self.prefer = prefer

    def add(self, a) -> None:
        self.parent.setdefault(a, a)

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        keep = ra if self.prefer is None else self.prefer(ra, rb)
        self.parent[rb if keep == ra else ra] = keep


# ----------------------------------------------------------------------------- calibration


def calib_feeds(calib: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model feeds of a calibration set, and its ``labels`` entry (None if absent)."""
    return {k: v for k, v in calib.items() if k != "labels"}, calib.get("labels")


def chunking(model: onnx.ModelProto, calib: dict[str, np.ndarray], samples: int,
             default_batch: int) -> tuple[int, int]:
    """(rows used, rows per onnxruntime run): at most ``samples`` calibration rows, fed in the
    model's fixed batch size, else in ``default_batch``."""
    return min(calib_rows(calib), samples), fixed_batch(model) or default_batch


def rows_per_batch(wanted: int, total: int, batch: int) -> int:
    """Rows to sample from each of the ``ceil(total / batch)`` batches to gather ``wanted``."""
    return math.ceil(wanted / max(1, math.ceil(total / batch)))


def run_first_output(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int
                     ) -> np.ndarray:
    """The model's first output over all rows of ``feeds``, run in chunks of ``batch``."""
    name = model.graph.output[0].name
    return collect(model, feeds, [name], batch=batch)[name]


def bias_vector(inits: dict, name: str | None, beta: float, k: int) -> np.ndarray:
    """A layer's bias ``beta * C`` as a float64 vector of its ``k`` outputs (zeros without
    one)."""
    if name is None:
        return np.zeros(k)
    b = numpy_helper.to_array(inits[name]).astype(np.float64) * beta
    return np.broadcast_to(b.reshape(-1) if b.size == k else b, (k,))


def ridge_solve(Z: np.ndarray, Y: np.ndarray, prior: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin ||Z X - Y||^2 + ridge * mean(diag(Z^T Z)) * ||X - prior||^2``: least squares
    pulled towards ``prior`` where the rows of Z do not determine X."""
    G = Z.T @ Z
    G += np.eye(len(G)) * (ridge * max(np.trace(G) / len(G), 1e-12))
    return prior + np.linalg.solve(G, Z.T @ (Y - Z @ prior))


def output_error(pred: np.ndarray, Y: np.ndarray) -> float:
    """``sqrt(sum (pred - Y)^2 / sum Y^2)`` (0-safe)."""
    return math.sqrt(float(np.sum((pred - Y) ** 2)) / max(float(np.sum(Y ** 2)), 1e-30))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` (0-safe)."""
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
