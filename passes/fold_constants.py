"""fold-constants: evaluate every sub-graph whose inputs are all constant.

Algebra: for a node ``y = f(c1, ..., cn)`` with every ``ci`` constant (an initializer, a
``Constant`` node, a ``ConstantOfShape`` of a constant shape, or a ``Shape`` of a tensor whose
shape is static), replace ``y`` by the initializer ``f(c1, ..., cn)`` computed once with
onnxruntime (onnx-graphsurgeon's folder). Repeated to a fixed point, so shape sub-graphs
(``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) of exported models become constants.
Exact: the folded values are the values the runtime would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from . import PassContext, PassReport, copy_model, register_pass
from ._gs import gs_transform
from ._toolkit import report_removed


@dataclass(frozen=True)
class FoldConstantsConfig:
    # Do not materialize a folded tensor bigger than this (bytes): e.g. a Tile of a constant.
    size_threshold: int = 64 << 20
    fold_shapes: bool = True


@register_pass("fold-constants", FoldConstantsConfig)
def fold_constants(model: onnx.ModelProto, config: FoldConstantsConfig, ctx: PassContext):
    report = PassReport("fold-constants")

    def fold(graph):
        graph.fold_constants(fold_shapes=config.fold_shapes, size_threshold=config.size_threshold,
                             error_ok=True, flatten_subgraphs=False)
        graph.cleanup(remove_unused_graph_inputs=False)

    out = gs_transform(copy_model(model), fold)
    report_removed(report, model, out, "folded into a constant initializer")
    return out, report
