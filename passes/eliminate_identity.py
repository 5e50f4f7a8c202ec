"""eliminate-identity: drop nodes that compute ``y = x`` at inference.

Algebra: ``Identity(x) = x``; ``Dropout(x) = x`` in inference (its mask output unused);
``Reshape(x, shape(x)) = x``; ``Cast(x, dtype(x)) = x``. Every reader of ``y`` reads ``x``
instead. When ``y`` is a graph output, the producer of ``x`` is renamed to write ``y`` (if
``x`` is itself a graph input or output, the node stays, with the reason). Exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from edgec.core.graph import attr, value_shapes

from . import PassContext, PassReport, copy_model, register_pass
from ._toolkit import set_nodes


@dataclass(frozen=True)
class EliminateIdentityConfig:
    dropout: bool = True
    noop_reshape: bool = True
    noop_cast: bool = True


def _is_noop(node: onnx.NodeProto, config: EliminateIdentityConfig, shapes, dtypes) -> str | None:
    op = node.op_type
    if op == "Identity":
        return "Identity"
    if op == "Dropout" and config.dropout:
        if len(node.output) > 1 and node.output[1]:
            return None
        return "Dropout at inference"
    if op == "Reshape" and config.noop_reshape:
        a, b = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is not None and a == b and all(isinstance(d, int) and d > 0 for d in a):
            return "Reshape to the same static shape"
    if op == "Cast" and config.noop_cast:
        if dtypes.get(node.input[0]) == attr(node, "to"):
            return "Cast to the same type"
    return None


@register_pass("eliminate-identity", EliminateIdentityConfig)
def eliminate_identity(model: onnx.ModelProto, config: EliminateIdentityConfig,
                       ctx: PassContext):
    m = copy_model(model)
    report = PassReport("eliminate-identity")
    shapes = value_shapes(m)
    dtypes = {vi.name: vi.type.tensor_type.elem_type
              for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output)}
    graph_in = {i.name for i in m.graph.input}
    graph_out = {o.name for o in m.graph.output}
    keep = []
    rename: dict[str, str] = {}  # value name -> replacement
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        why = _is_noop(node, config, shapes, dtypes)
        if why is None:
            keep.append(node)
            continue
        x, y = node.input[0], node.output[0]
        if y not in graph_out:
            rename[y] = x
            report.rewrite(node, f"removed ({why})")
            continue
        # y is a graph output: make x's producer write y directly.
        producer = next((n for n in keep if x in n.output), None)
        if producer is None or x in graph_in or x in graph_out:
            keep.append(node)
            report.skip(node, f"{why}, but it connects a graph input/output to a graph output")
            continue
        idx = list(producer.output).index(x)
        producer.output[idx] = y
        rename[x] = y
        for k in keep:  # earlier readers of x already rewired? rewire them to y
            for j, name in enumerate(k.input):
                if name == x:
                    k.input[j] = y
        report.rewrite(node, f"removed ({why}); producer now writes the graph output")
    set_nodes(m, keep)
    return m, report
