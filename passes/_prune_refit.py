"""The prune pass's reconstruction: each reader of a pruned group refitted by ridge least
squares, in graph order, from the pruned model's activations to the unpruned model's
outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import all_names, attr, initializers, set_provenance, unique_name
from edgec.core.graph import value_shapes

from . import copy_model
from ._calib import sample_patches, sample_rows
from ._toolkit import (bias_vector, chunking, drop_unused_initializers, output_error, set_bias,
                       ridge_solve, rows_per_batch, stream_activations)

PASS = "prune"


def _reader_rows(node, kernel, x: np.ndarray, shapes_out, n_rows: int, rng) -> np.ndarray:
    if node.op_type == "Conv":
        return sample_patches(x, kernel, attr(node, "strides", [1, 1]),
                              attr(node, "dilations", [1, 1]),
                              tuple(attr(node, "pads", [0, 0, 0, 0])), shapes_out, n_rows, rng)
    return sample_rows(x, n_rows, rng)


class _Capture:
    """Input rows of the refitted readers, sampled at positions keyed by (seed, reader index,
    batch): identical in the original and the pruned model."""

    def __init__(self, original, ctx, config):
        self.ctx = ctx
        self.orig_nodes = {n.name: n for n in original.graph.node}
        self.orig_inits = {k: numpy_helper.to_array(v) for k, v in initializers(original).items()}
        self.shapes = value_shapes(original)
        self.total, self.batch = chunking(original, ctx.calib, config.calib_samples, 32)
        self.per = rows_per_batch(config.calib_rows, self.total, self.batch)

    def rows(self, model, items, which: str, first: int = 0) -> dict[int, np.ndarray]:
        out = {i: [] for i in range(len(items))}
        names = [(self.orig_nodes[n.name].input[0] if which == "orig" else n.input[0])
                 for n, _, _ in items]
        for bi, acts in enumerate(stream_activations(model, self.ctx.calib, names,
                                                     batch=self.batch, limit=self.total)):
            for i, (node, _, _) in enumerate(items):
                rng = np.random.default_rng([self.ctx.seed, first + i, bi])
                out_hw = self.shapes.get(node.output[0])
                out_hw = out_hw[2:4] if out_hw and len(out_hw) == 4 else None
                kernel = self.orig_inits[self.orig_nodes[node.name].input[1]].shape[2:4]
                out[i].append(_reader_rows(node, kernel, acts[names[i]], out_hw, self.per, rng))
        return {i: np.concatenate(v) for i, v in out.items()}


def reconstruct(original, m, refit, out_kept, ctx, config, report) -> onnx.ModelProto:
    """Refit each reader's weights (and bias) by ridge least squares, in graph order, from the
    pruned model's activations to the unpruned model's outputs."""
    from edgec.core.importer import infer_shapes

    if any(node.op_type == "Conv" and attr(node, "auto_pad", b"NOTSET") not in
           (b"NOTSET", "NOTSET") for node, _, _ in refit):
        report.details["reconstruction"].append({"skipped": "auto_pad convs are not refitted"})
        return m
    cap = _Capture(original, ctx, config)
    orig_rows = cap.rows(original, refit, "orig")
    for i, (node, x, idx) in enumerate(refit):
        cur = infer_shapes(m)
        node_now = next(n for n in cur.graph.node if n.name == node.name)
        X = cap.rows(cur, [(node_now, x, idx)], "cur", first=i)[0]
        W0 = cap.orig_inits[cap.orig_nodes[node.name].input[1]].astype(np.float64)
        out_idx = out_kept.get(node.name)  # a reader that is itself a pruned producer
        if out_idx is not None:
            W0 = W0[out_idx]
        W1 = numpy_helper.to_array(initializers(cur)[node_now.input[1]])
        got = _fit(node, orig_rows[i], X, W0, W1.astype(np.float64), config.ridge)
        report.details["reconstruction"].append(got[0])
        if got[1] is not None:
            m = _set_weight_and_bias(m, node.name, got[1], got[2], W1.dtype)
    return m


def _fit(node, A: np.ndarray, X: np.ndarray, W0: np.ndarray, W1: np.ndarray, ridge: float):
    """(report entry, new weight, bias shift) of one reader fitted on 80 % of the rows; the
    weight is None where the held-out 20 % do not get closer to the unpruned outputs."""
    if node.op_type == "Conv":
        K = W0.shape[0]
        Y = A.reshape(len(A), -1).astype(np.float64) @ W0.reshape(K, -1).T
        Xf = X.reshape(len(X), -1).astype(np.float64)
        prior = W1.reshape(K, -1).T
    else:
        trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
        Wm0 = W0.T if trans_b else W0          # [in, out]
        Wm1 = W1.T if trans_b else W1
        alpha = attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
        Y = alpha * A.astype(np.float64) @ Wm0
        Xf = X.astype(np.float64)
        prior = alpha * Wm1
    n = len(Xf)
    cut = int(n * 0.8)
    Z = np.concatenate([Xf, np.ones((n, 1))], axis=1)
    P = np.concatenate([prior, np.zeros((1, prior.shape[1]))], axis=0)
    sol = ridge_solve(Z[:cut], Y[:cut], P, ridge)
    e0 = output_error(Z[cut:] @ P, Y[cut:])
    e1 = output_error(Z[cut:] @ sol, Y[cut:])
    entry = {"node": node.name, "rows": n, "held_out_error_before": round(e0, 5),
             "held_out_error_after": round(e1, 5), "applied": e1 < e0}
    if not e1 < e0:
        return entry, None, None
    Wn, db = sol[:-1], sol[-1]
    if node.op_type == "Conv":
        Wn = Wn.T.reshape(W1.shape)
    else:
        Wn = Wn / alpha
        Wn = Wn.T if trans_b else Wn
    return entry, Wn, db


def _set_weight_and_bias(m, node_name: str, W: np.ndarray, db: np.ndarray, dtype):
    m = copy_model(m)
    node = next(n for n in m.graph.node if n.name == node_name)
    inits = initializers(m)
    names = all_names(m)
    wname = unique_name(names, f"{node.input[1]}_refit")
    m.graph.initializer.append(numpy_helper.from_array(W.astype(dtype), wname))
    node.input[1] = wname
    K = len(db)
    if node.op_type == "MatMul":
        b0 = np.zeros(K)
        bname = unique_name(names, f"{node_name}_refit_bias")
        m.graph.initializer.append(numpy_helper.from_array((b0 + db).astype(dtype), bname))
        mid = unique_name(names, f"{node.output[0]}_pre_bias")
        out = node.output[0]
        node.output[0] = mid
        add = onnx.helper.make_node("Add", [mid, bname], [out],
                                    name=unique_name(names, f"{node_name}/refit_bias"))
        set_provenance(add, PASS, node_name, changed="reconstruction bias")
        pos = list(m.graph.node).index(node)
        m.graph.node.insert(pos + 1, add)
    else:
        beta = attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        b0 = bias_vector(inits, node.input[2] if len(node.input) > 2 and node.input[2]
                         else None, beta, K)
        bname = unique_name(names, f"{node_name}_refit_bias")
        m.graph.initializer.append(numpy_helper.from_array((b0 + db).astype(dtype), bname))
        set_bias(node, bname)
    set_provenance(node, PASS, node_name, changed="reconstructed")
    return drop_unused_initializers(m)
