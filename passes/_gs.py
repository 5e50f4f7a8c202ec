"""onnx-graphsurgeon round trips that keep what graphsurgeon drops (node metadata_props,
model metadata, the ir_version)."""

from __future__ import annotations

import logging
from typing import Callable

import onnx


def gs_transform(model: onnx.ModelProto, fn: Callable) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    gs.logger.G_LOGGER.module_severity = gs.logger.G_LOGGER.ERROR
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.metadata_props}
    graph = gs.import_onnx(model)
    fn(graph)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    for node in out.graph.node:
        for p in meta.get(node.name, []):
            node.metadata_props.add().CopyFrom(p)
    # graphsurgeon can lose the shapes of graph inputs/outputs it did not infer itself
    known = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for v in list(out.graph.input) + list(out.graph.output):
        if v.name in known and not v.type.tensor_type.HasField("shape"):
            v.type.CopyFrom(known[v.name].type)
    return out
