"""sparse: zero Conv and Gemm/MatMul weights (per weight or in output-channel blocks); OBS w/ calib.

Algebra. Write a layer as ``y = W x + b`` with W the weight matrix ``[out, in]`` (Conv, group
1: ``[K, C*kh*kw]`` over the im2col patch (c, ky, kx); Gemm: ``op(B)^T``, i.e. B itself with
transB=1 and ``B^T`` with transB=0; MatMul with a constant right operand ``B [K, N]``:
``B^T``). The pass replaces W by ``W' = M o W~`` with a 0/1 mask M keeping ``density`` of the
weights and leaves the graph otherwise as it is: the ONNX stays dense, with zeros (the CPU
kernels find the zeros, or the blocks of them, themselves).

* ``pattern=unstructured``: M is free per weight.
* ``pattern=block`` (``block=B``): the output rows ``[bB, bB + B)`` (aligned at multiples of
  B from 0; a shorter last block when B does not divide the outputs) share one mask over the
  inputs, so B consecutive output channels read the same inputs.

Without calibration data, ``W~ = W`` and M keeps the largest magnitudes (per layer; per
block the largest summed squares). With ``--calib`` the pass is data-aware, one-shot OBS as
in SparseGPT: with the layer's input rows X (sampled im2col patches for a Conv, input rows
for a Gemm/MatMul) and ``H = X^T X / n + lambda I`` (``lambda = damp * mean diag``), the
inputs are processed in order; every ``obs_block`` columns the mask is chosen by the
saliency ``w^2 / [U]_ii^2`` (U the upper Cholesky factor of ``H^-1``) and each zeroed weight's
error is pushed onto the weights not yet processed, which minimizes ``||X (W - W')^T||`` for
the remaining weights; the zeros per column block follow the whole layer's saliency ranking
(``spread=global``; ``even``: SparseGPT's same fraction in each). Layers are processed in
graph order on the activations the already sparsified layers produce (``sequential``): the
dense weight is first refitted to map those inputs X onto the dense model's outputs
``X0 W^T`` (``refit``; OBS then minimizes ``||X W'^T - X0 W^T||``), and the bias absorbs the
mean output shift (``refit_bias``, kept only where held-out rows agree). With ``relu_aware``
an output read by one Relu alone has its saliency weighted by how often that Relu passes it
(units dead on the calibration data lose all their weights).

How many: ``density`` (fraction kept in every layer), or ``model_density`` (the default,
0.5, when neither is set): one budget for all eligible layers' weights together, allocated
where it is cheapest -- each layer's relative error is measured over a density grid (output
error from H, after OBS, with calib; weight error of magnitude masks without), and the
densities that minimize the summed error at the budget are found greedily on the convex hulls
of the curves.
``density=1`` leaves every weight exactly as it is. Layers with fewer than ``min_weights``
weights (a first conv on 1-3 channels) stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.core.graph import all_names, attr, set_provenance, unique_name

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._lowrank_layer import calibrate
from ._sparse_obs import (allocate, curve, inverse_factor, keep_count, magnitude, obs,
                          output_error, refit, weight_error)
from ._toolkit import ancestors, bias_vector, drop_replaced, producers, set_bias
from ._weight_layers import WeightLayer, constant, select
from ._toolkit import output_error as rows_error

PASS = "sparse"
DEFAULT_DENSITY = 0.5
PATTERNS = ("unstructured", "block")


@dataclass(frozen=True)
class SparseConfig:
    density: float | None = None        # fraction of weights kept in every layer
    model_density: float | None = None  # one budget for all eligible layers, allocated
    #                                     (neither set: model_density=0.5)
    pattern: Literal["unstructured", "block"] = "unstructured"
    block: int = 4                      # pattern=block: output channels sharing one mask
    min_weights: int = 1024             # smaller layers stay dense
    include: tuple[str, ...] = ()       # only these nodes (names), if given
    exclude: tuple[str, ...] = ()       # never these nodes
    conv: bool = True
    gemm: bool = True                   # Gemm and MatMul
    data_aware: bool = True             # OBS on --calib activations when given
    sequential: bool = True             # ... on the inputs the sparsified layers above produce
    refit: bool = True                  # ... refitted first to the dense model's outputs
    refit_bias: bool = True             # ... and the bias absorbs the mean output shift
    relu_aware: bool = True             # ... an output's error weighted by how often the
    #                                     ReLU after it passes it (dead units cost nothing)
    obs_block: int = 128                # columns per OBS mask selection
    spread: Literal["global", "even"] = "global"  # zeros per column block: by the layer's
    #                                     saliency ranking, or the same fraction in each
    damp: float = 0.01                  # H damping, relative to its mean diagonal
    calib_samples: int = 1024           # calibration rows (images) used at most
    calib_rows: int = 8192              # input rows (im2col patches) sampled per layer

    def __post_init__(self):
        for k in ("density", "model_density"):
            v = getattr(self, k)
            if v is not None and not (0.0 < v <= 1.0):
                raise ValueError(f"{k} must be within (0, 1] (the fraction of weights kept), "
                                 f"got {v}")
        if self.density is not None and self.model_density is not None:
            raise ValueError("set density (per layer) or model_density (one budget), not both")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got "
                             f"'{self.pattern}'")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.obs_block < 1 or self.min_weights < 0:
            raise ValueError("obs_block >= 1 and min_weights >= 0 required")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.calib_rows < 16 or self.calib_samples < 1:
            raise ValueError("calib_rows >= 16 and calib_samples >= 1 required")

    def chosen(self) -> str:
        if self.density is not None:
            return f"density={self.density} per layer"
        if self.model_density is not None:
            return f"model_density={self.model_density} (one budget for all eligible layers)"
        return f"model_density={DEFAULT_DENSITY} (one budget for all eligible layers; " \
               "the default)"

    @property
    def budget(self) -> float | None:
        """The model density in effect (None: a per-layer density)."""
        if self.density is not None:
            return None
        return self.model_density if self.model_density is not None else DEFAULT_DENSITY

    @property
    def block_rows(self) -> int | None:
        return self.block if self.pattern == "block" else None


# ----------------------------------------------------------------------------- the pass

@register_pass(PASS, SparseConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.9))
def sparse(model: onnx.ModelProto, config: SparseConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport(PASS)
    disabled = {**({} if config.conv else {"Conv": "convs disabled (sparse.conv=false)"}),
                **({} if config.gemm else {op: "Gemm/MatMul disabled (sparse.gemm=false)"
                                           for op in ("Gemm", "MatMul")})}
    targets = select(m, config, report, PASS, disabled=disabled)
    data = bool(ctx.calib) and config.data_aware and bool(targets)
    method = "obs" if data else "magnitude"
    H0, rows0, rw = {}, {}, {}
    if data:
        rows0 = _rows(m, list(enumerate(targets)), ctx, config)
        H0 = {k: _second_moment(v) for k, v in rows0.items()}
        if config.relu_aware:
            rw = _relu_activity(m, targets, rows0)
    dens, alloc = _densities(targets, H0, rw, config)
    w = _Writer(m)
    table = []
    changed: set[str] = set()
    for i, t in enumerate(targets):
        d = dens[t.name]
        if d >= 1.0:
            report.skip(t.L.node, "density 1: every weight kept")
            continue
        row = {"node": t.name, "op": t.L.node.op_type, "pattern": config.pattern,
               "block": config.block_rows, "density_requested": round(d, 6),
               "weights": int(t.Wm.size), "method": method}
        bias_shift = None
        if data and t.name in H0:
            Wp, bias_shift = _obs_layer(m, t, i, d, rows0, H0, rw.get(t.name), changed, ctx,
                                        config, row)
        else:
            Wp = magnitude(t.Wm, d, config.block_rows)
            if data:
                row["method"] = "magnitude (too few calibration rows)"
        nnz = int(np.count_nonzero(Wp))
        row.update(density_achieved=round(nnz / t.Wm.size, 6), nnz=nnz,
                   weight_error=round(weight_error(t.Wm, Wp), 6))
        w.set_weight(t, Wp, bias_shift, d)
        changed.add(t.name)
        report.rewrite(t.L.node, f"{config.pattern} sparsity: {nnz}/{t.Wm.size} weights kept "
                       f"(density {nnz / t.Wm.size:.4f})",
                       **{k: v for k, v in row.items() if k not in ("node", "op")})
        table.append(row)
    total = sum(int(t.Wm.size) for t in targets)
    kept = sum(r["nnz"] for r in table) + sum(int(t.Wm.size) for t in targets
                                               if dens[t.name] >= 1.0)
    report.details = {"chosen": config.chosen(), "method": method, "pattern": config.pattern,
                      "block": config.block_rows, "layers": table,
                      "eligible_weights": total, "eligible_kept": kept,
                      "eligible_density": round(kept / max(total, 1), 6),
                      "conv_gemm_density": _conv_gemm_density(m)}
    if alloc is not None:
        report.details["allocation"] = alloc
    if not report.modified:
        return m, report
    return w.finish(), report


def _rows(m, items: list[tuple[int, WeightLayer]], ctx, config) -> dict[str, np.ndarray]:
    """Input rows [n, in] per layer; the positions depend on (seed, layer index, batch)
    only, so a capture from the sparsified model samples the same ones."""
    got = calibrate(m, [(i, t.L) for i, t in items], ctx.calib, config, ctx.seed)
    return {k: v.reshape(len(v), -1).astype(np.float64) for k, v in got.items() if len(v) >= 16}


def _second_moment(X: np.ndarray) -> np.ndarray:
    return X.T @ X / len(X)


def _relu_activity(m, targets, rows0) -> dict[str, np.ndarray]:
    """Layer name -> fraction of calibration rows on which each output passes the ReLU that
    alone reads the layer's output (layers not followed by one ReLU: absent)."""
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    outs = {o.name for o in m.graph.output}
    inits = {t.name: t for t in m.graph.initializer}
    got = {}
    for t in targets:
        y = t.L.node.output[0]
        r = readers.get(y, [])
        if t.name not in rows0 or y in outs or len(r) != 1 or r[0].op_type != "Relu":
            continue
        node = t.L.node
        bname = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        b = bias_vector(inits, bname, beta, t.Wm.shape[0])
        got[t.name] = np.mean(t.alpha * (rows0[t.name] @ t.Wm.T) + b > 0, axis=0)
    return got


def _densities(targets, H0, rw, config: SparseConfig) -> tuple[dict, dict | None]:
    """Layer name -> density, and the allocation table for a model budget."""
    if config.budget is None:
        return {t.name: config.density for t in targets}, None
    if config.budget >= 1.0 or not targets:
        return {t.name: 1.0 for t in targets}, {"budget": 1.0}
    curves = [curve(t.Wm, H0.get(t.name), config.block_rows, config.obs_block, config.damp,
                    bool(H0), rw.get(t.name), config.spread) for t in targets]
    sizes = [int(t.Wm.size) for t in targets]
    budget = config.budget * sum(sizes)
    dens = allocate(curves, sizes, budget)
    out = {t.name: d for t, d in zip(targets, dens)}
    return out, {"budget_weights": int(round(budget)),
                 "error_of": "outputs" if H0 else "weights",
                 "densities": {t.name: round(d, 5) for t, d in zip(targets, dens)},
                 "predicted_error": {t.name: round(float(np.interp(d, _grid(), c)), 5)
                                     for t, d, c in zip(targets, dens, curves)}}


def _grid():
    from ._sparse_obs import GRID

    return np.array(GRID)


def _obs_layer(m, t: WeightLayer, i: int, d: float, rows0, H0, rw, changed: set, ctx, config,
               row):
    """(sparse weight matrix, bias shift or None) of one layer by OBS on the inputs the
    already sparsified layers produce; errors into ``row``."""
    X0 = rows0[t.name]
    X, H, W = X0, H0[t.name], t.Wm
    if config.sequential and changed & ancestors(t.L.node, producers(m)):
        X = _rows(m, [(i, t)], ctx, config).get(t.name)
        if X is None or len(X) != len(X0):
            X = X0
        else:
            H = _second_moment(X)
            row["sequential"] = True
            if config.refit:
                W = refit(t.Wm, X, X0, config.damp)
    U, dead = inverse_factor(H, config.damp)
    Wp = obs(W, U, dead, d, config.block_rows, config.obs_block, rw, config.spread)
    row["output_error"] = round(output_error(W, Wp, H), 6)
    if rw is not None:
        row["relu_weighted_output_error"] = round(output_error(W, Wp, H, rw), 6)
        row["dead_outputs"] = int(np.sum(rw == 0))
    if config.refit_bias:
        Y0 = t.alpha * (X0 @ t.Wm.T)       # the dense model's layer output (without bias)
        Y = t.alpha * (X @ Wp.T)
        n = len(X)
        cut = int(n * 0.8)
        db = (Y0[:cut] - Y[:cut]).mean(axis=0)
        e0 = rows_error(Y[cut:], Y0[cut:])
        e1 = rows_error(Y[cut:] + db, Y0[cut:])
        row["output_error_vs_dense_model"] = round(min(e0, e1), 6)
        if e1 < e0:
            row["bias_refit"] = True
            return Wp, (Y0 - Y).mean(axis=0)
    return Wp, None


def _conv_gemm_density(m) -> float:
    """Nonzero fraction of all constant Conv/Gemm/MatMul weights of ``m``."""
    inits = {t.name: t for t in m.graph.initializer}
    prod = producers(m)
    nz = tot = 0
    for node in m.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            W = constant(m, node.input[1], inits, prod)
            if W is not None and np.issubdtype(W.dtype, np.floating):
                nz += int(np.count_nonzero(W))
                tot += int(W.size)
    return round(nz / max(tot, 1), 6)


class _Writer:
    """Writes sparse weights (new initializers) and bias shifts into the model copy, in place,
    so later layers' captures see them."""

    def __init__(self, m: onnx.ModelProto):
        self.m = m
        self.names = all_names(m)
        self.old: set[str] = set()

    def _node(self, name: str):
        return next(n for n in self.m.graph.node if n.name == name)

    def _init(self, base: str, arr: np.ndarray) -> str:
        name = unique_name(self.names, base)
        self.m.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def set_weight(self, t: WeightLayer, Wp: np.ndarray, bias_shift, density: float) -> None:
        node = self._node(t.name)
        self.old.add(node.input[1])
        node.input[1] = self._init(f"{node.input[1]}_sparse", t.to_stored(Wp))
        set_provenance(node, PASS, node.name, changed="weights zeroed",
                       density=round(density, 6))
        if bias_shift is None or not np.any(bias_shift):
            return
        dt = t.stored.dtype
        K = len(bias_shift)
        inits = {x.name: x for x in self.m.graph.initializer}
        if node.op_type == "MatMul":
            bname = self._init(f"{node.name}_sparse_bias", bias_shift.astype(dt))
            mid = unique_name(self.names, f"{node.output[0]}_pre_bias")
            out = node.output[0]
            node.output[0] = mid
            add = helper.make_node("Add", [mid, bname], [out],
                                   name=unique_name(self.names, f"{node.name}/sparse_bias"))
            set_provenance(add, PASS, node.name, changed="bias shift")
            pos = [n.name for n in self.m.graph.node].index(node.name)
            self.m.graph.node.insert(pos + 1, add)
            return
        has = len(node.input) > 2 and node.input[2]
        if has and node.input[2] not in inits:
            return  # a bias that is not an initializer: left as it is
        beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if has:
            self.old.add(node.input[2])
        b0 = bias_vector(inits, node.input[2] if has else None, beta, K)
        bname = self._init(f"{node.name}_sparse_bias", (b0 + bias_shift).astype(dt))
        set_bias(node, bname)

    def finish(self) -> onnx.ModelProto:
        """Drop the replaced weights no node reads any more (with their graph-input entry,
        and Constant nodes that produced them)."""
        return drop_replaced(self.m, self.old)


__all__ = ["SparseConfig", "sparse", "keep_count"]
