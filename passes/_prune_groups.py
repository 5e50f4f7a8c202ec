"""The prune pass's dependency groups: which output channels of which Convs are tied together
(residual operands, depthwise convs and BN passing channels through, concatenations), which
readers must be sliced with them, and which groups must be left alone and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import attr

from ._toolkit import UnionFind, optional_input

UNARY = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
         "Elu", "Selu", "Softplus", "Identity", "Dropout", "Neg", "Abs", "Mish", "Gelu",
         "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min"}


@dataclass
class Graph:
    """Channel maps: which (group, channel range) each channel of a tensor comes from."""
    maps: dict = field(default_factory=dict)     # tensor -> [(gid, lo, hi)]
    flat: dict = field(default_factory=dict)     # tensor -> ([(gid, lo, hi)], spatial size)
    sources: dict = field(default_factory=dict)  # gid -> Conv node producing it
    uf: UnionFind = field(default_factory=lambda: UnionFind(prefer=min))
    frozen: dict = field(default_factory=dict)   # gid -> reason
    readers: list = field(default_factory=list)  # (kind, node, tensor) to slice

    def new(self, node, channels: int) -> list:
        gid = len(self.sources)
        self.sources[gid] = node
        self.uf.add(gid)
        return [(gid, 0, channels)]

    def find(self, g: int) -> int:
        return self.uf.find(g)

    def union(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def freeze(self, segs, reason: str) -> None:
        for gid, _, _ in segs:
            self.frozen.setdefault(gid, reason)

    def channels(self, x: str) -> int:
        return sum(hi - lo for _, lo, hi in self.maps[x])


def _couple(g: Graph, a: list, b: list, op: str) -> bool:
    if len(a) == len(b) and all(x[1:] == y[1:] for x, y in zip(a, b)) and \
            all(x[1] == 0 for x in a):
        for x, y in zip(a, b):
            g.union(x[0], y[0])
        return True
    g.freeze(a + b, f"{op} joins tensors whose channels come from different concatenations")
    return False


def channel_const(arr: np.ndarray, rank: int, channels: int) -> str:
    """How a constant operand broadcasts against [N, C, ...] of ``rank``: 'none' (no channel
    axis), 'slice' (one value per channel) or 'bad'."""
    if arr.ndim == 0 or arr.size == 1:
        return "none"
    if arr.ndim > rank:
        return "bad"
    axis = 1 - (rank - arr.ndim)  # the channel axis in the constant's own indexing
    if axis < 0:
        return "none" if all(d == 1 for d in arr.shape) else "bad"
    if arr.shape[axis] == 1:
        return "none"
    if arr.shape[axis] == channels and all(d == 1 for i, d in enumerate(arr.shape)
                                           if i > axis):
        return "slice"
    return "bad"


# Each handler returns True when it dealt with the node; False leaves the node to the default
# (it freezes every group the node reads).

def _conv(g: Graph, node, consts: dict, shapes: dict) -> bool:
    w = consts.get(node.input[1]) if len(node.input) > 1 else None
    group = attr(node, "group", 1)
    x = node.input[0]
    if x in g.maps:
        c_in = g.channels(x)
        if w is None:
            g.freeze(g.maps[x], f"read by {node.name} whose weight is not a constant")
        elif group == 1:
            g.readers.append(("conv", node, x))
        elif group == c_in and w.shape[0] == c_in and w.shape[1] == 1:
            g.readers.append(("dwconv", node, x))
            if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
                g.freeze(g.maps[x], f"depthwise {node.name} has a non-constant bias")
            g.maps[node.output[0]] = g.maps[x]
            return True
        else:
            g.freeze(g.maps[x], f"read by grouped conv {node.name} (group={group})")
    if w is not None and group == 1 and w.ndim >= 3:
        bias = optional_input(node, 2)
        if bias is None or bias in consts:
            g.maps[node.output[0]] = g.new(node, w.shape[0])
    return True


def _batchnorm(g: Graph, node, consts: dict, shapes: dict) -> bool:
    x = node.input[0]
    if x in g.maps:
        if all(i in consts for i in node.input[1:5]) and len(
                [o for o in node.output if o]) == 1:
            g.readers.append(("bn", node, x))
            g.maps[node.output[0]] = g.maps[x]
        else:
            g.freeze(g.maps[x], f"BatchNormalization {node.name} in training mode or "
                                "with non-constant statistics")
    return True


def _unary(g: Graph, node, consts: dict, shapes: dict) -> bool:
    if not (node.input and node.input[0] in g.maps):
        return False
    if node.op_type == "PRelu" and len(node.input) > 1:
        slope = consts.get(node.input[1])
        rank = len(shapes.get(node.input[0]) or ())
        kind = channel_const(slope, rank, g.channels(node.input[0])) \
            if slope is not None else "bad"
        if kind == "bad":
            g.freeze(g.maps[node.input[0]], f"PRelu {node.name} slope does not "
                                            "broadcast per channel")
        elif kind == "slice":
            g.readers.append(("const1", node, node.input[0]))
    g.maps[node.output[0]] = g.maps[node.input[0]]
    return True


def _binary(g: Graph, node, consts: dict, shapes: dict) -> bool:
    if len(node.input) != 2:
        return False
    op = node.op_type
    a, b = node.input
    if a in g.maps and b in g.maps:
        _couple(g, g.maps[a], g.maps[b], f"{op} {node.name}")
        g.maps[node.output[0]] = g.maps[a]
        return True
    if (a in g.maps) == (b in g.maps):
        return False
    x, other = (a, b) if a in g.maps else (b, a)
    arr = consts.get(other)
    rank = len(shapes.get(x) or ())
    out_shape = shapes.get(node.output[0])
    if arr is None:
        g.freeze(g.maps[x], f"{op} {node.name} combines it with a computed tensor")
        return True
    kind = channel_const(arr, rank, g.channels(x))
    if kind == "bad" or (out_shape is not None and len(out_shape) != rank):
        g.freeze(g.maps[x], f"{op} {node.name}: constant does not broadcast per channel")
        return True
    if kind == "slice":
        g.readers.append(("const", node, x))
    g.maps[node.output[0]] = g.maps[x]
    return True


def _concat(g: Graph, node, consts: dict, shapes: dict) -> bool:
    mapped = [i for i in node.input if i in g.maps]
    if not mapped:
        return False
    rank = len(shapes.get(node.input[0]) or ())
    axis = attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    if axis == 1 and len(mapped) == len(node.input):
        g.maps[node.output[0]] = [s for i in node.input for s in g.maps[i]]
    else:
        for i in mapped:
            g.freeze(g.maps[i], f"Concat {node.name} mixes it with unmapped tensors or "
                                f"concatenates on axis {axis}")
    return True


def _flatten(g: Graph, node, consts: dict, shapes: dict) -> bool:
    if node.input[0] not in g.maps:
        return False
    xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
    ok = (xs is not None and ys is not None and len(xs) == 4 and len(ys) == 2
          and all(isinstance(d, int) and d > 0 for d in xs[1:])
          and ys[1] == xs[1] * xs[2] * xs[3]
          and (node.op_type == "Reshape" or attr(node, "axis", 1) == 1))
    if ok:
        g.flat[node.output[0]] = (g.maps[node.input[0]], xs[2] * xs[3])
    else:
        g.freeze(g.maps[node.input[0]], f"{node.op_type} {node.name} is not a flatten of NCHW "
                                        "into [N, C*H*W]")
    return True


def _gemm(g: Graph, node, consts: dict, shapes: dict) -> bool:
    if not (node.input and node.input[0] in g.flat):
        return False
    ok = (len(node.input) > 1 and node.input[1] in consts
          and consts[node.input[1]].ndim == 2
          and (node.op_type == "MatMul" or attr(node, "transA", 0) == 0))
    if ok:
        g.readers.append(("flatgemm", node, node.input[0]))
    else:
        g.freeze(g.flat[node.input[0]][0], f"{node.op_type} {node.name} after the flatten "
                                           "has a non-constant weight or transA")
    return True


HANDLERS = {"Conv": _conv, "BatchNormalization": _batchnorm, "Concat": _concat,
            "Flatten": _flatten, "Reshape": _flatten, "Gemm": _gemm, "MatMul": _gemm,
            **{op: _unary for op in UNARY}, **{op: _binary for op in BINARY}}


def build_groups(m: onnx.ModelProto, inits: dict, shapes: dict) -> Graph:
    """Walk the graph in order, mapping each tensor's channels to the Conv groups they come
    from; every reader the groups need sliced is recorded, every group that cannot be pruned
    is frozen with the reason."""
    g = Graph()
    consts = {k: numpy_helper.to_array(v) for k, v in inits.items()}
    for node in m.graph.node:
        handler = HANDLERS.get(node.op_type)
        if handler is not None and handler(g, node, consts, shapes):
            continue
        for i in node.input:
            if i in g.maps:
                g.freeze(g.maps[i], f"read by {node.op_type} {node.name}, which is not "
                                    "channel-aware")
        for i in node.input:
            if i in g.flat:
                g.freeze(g.flat[i][0], f"flattened channels read by {node.op_type} {node.name}")
    for o in m.graph.output:
        if o.name in g.maps:
            g.freeze(g.maps[o.name], f"reaches the graph output {o.name}")
        if o.name in g.flat:
            g.freeze(g.flat[o.name][0], f"reaches the graph output {o.name}")
    return g
