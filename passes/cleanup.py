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
from ._toolkit import report_removed


@dataclass(frozen=True)
class CleanupConfig:
    toposort: bool = True


@register_pass("cleanup", CleanupConfig)
def cleanup(model: onnx.ModelProto, config: CleanupConfig, ctx: PassContext):
    report = PassReport("cleanup")
    inits_before = {t.name for t in model.graph.initializer}

    def clean(graph):
        graph.cleanup(remove_unused_graph_inputs=False)
        if config.toposort:
            graph.toposort()

    out = gs_transform(copy_model(model), clean)
    report_removed(report, model, out, "removed: no graph output depends on it")
    dropped = inits_before - {t.name for t in out.graph.initializer}
    if dropped:
        report.details["unused_initializers_removed"] = len(dropped)
        report.modified = True
    return out, report
