"""cleanup: remove dead nodes and unused initializers, sort nodes topologically.

Algebra: a node none of whose outputs reaches a graph output contributes nothing to
``outputs = G(inputs)``; dropping it, and every initializer no remaining node reads, leaves
``G`` unchanged. Exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from . import PassContext, PassReport, copy_model, register_pass
from ._gs import gs_transform


@dataclass(frozen=True)
class CleanupConfig:
    toposort: bool = True


@register_pass("cleanup", CleanupConfig)
def cleanup(model: onnx.ModelProto, config: CleanupConfig, ctx: PassContext):
    report = PassReport("cleanup")
    before = {n.name: n.op_type for n in model.graph.node}
    inits_before = {t.name for t in model.graph.initializer}

    def clean(graph):
        graph.cleanup(remove_unused_graph_inputs=False)
        if config.toposort:
            graph.toposort()

    out = gs_transform(copy_model(model), clean)
    after = {n.name for n in out.graph.node}
    for name, op in before.items():
        if name not in after:
            report.rewrite(name, "removed: no graph output depends on it", op=op)
    dropped = inits_before - {t.name for t in out.graph.initializer}
    if dropped:
        report.details["unused_initializers_removed"] = len(dropped)
        report.modified = True
    return out, report
