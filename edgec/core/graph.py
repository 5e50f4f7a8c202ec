"""Small helpers over onnx protobufs shared by the importer, the passes and the statistics."""

from __future__ import annotations

import itertools
from collections import defaultdict

import onnx


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Static shapes known for every value (inputs, outputs, value_info, initializers).

    Unknown dimensions are ``None``.
    """
    shapes: dict[str, tuple] = {}
    for vi in itertools.chain(model.graph.input, model.graph.value_info, model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in t.shape.dim)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def unique_name(taken: set[str], base: str) -> str:
    if base not in taken:
        taken.add(base)
        return base
    for i in itertools.count(1):
        cand = f"{base}_{i}"
        if cand not in taken:
            taken.add(cand)
            return cand
    raise AssertionError


def all_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names.update(i.name for i in model.graph.input)
    for n in model.graph.node:
        names.update(n.input)
        names.update(n.output)
        if n.name:
            names.add(n.name)
    return names


def set_provenance(node: onnx.NodeProto, pass_name: str, origin: str, **extra) -> None:
    """Record which pass made ``node`` and from which original node.

    ONNX ``NodeProto.metadata_props`` (IR version 10+) carries it; the keys are
    ``edgec.pass``, ``edgec.origin`` and ``edgec.<key>`` for extra facts.
    """
    items = {"edgec.pass": pass_name, "edgec.origin": origin}
    items.update({f"edgec.{k}": str(v) for k, v in extra.items()})
    for k, v in items.items():
        entry = node.metadata_props.add()
        entry.key, entry.value = k, v


def provenance(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key.startswith("edgec.")}
