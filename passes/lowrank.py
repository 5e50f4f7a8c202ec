"""lowrank: Conv and Gemm/MatMul weights as low-rank pairs (SVD), data-aware with --calib.

Algebra. Write a layer as ``y = W x`` with W the weight matrix (out x in):

* **weight SVD** (Conv, groups=1): W[K,C,kh,kw] viewed as K x (C*kh*kw) = U S V^T. Keep r
  singular values: ``W ~ W2 W1`` with ``W1 = sqrt(S_r) V_r^T`` (r x C*kh*kw, a Conv with the
  original kernel, stride, pads and dilation, no bias) and ``W2 = U_r sqrt(S_r)`` (K x r, a 1x1
  Conv carrying the bias). MACs per output pixel: ``K*C*kh*kw -> r*(C*kh*kw + K)``.
* **spatial SVD**: W viewed as (C*kh) x (K*kw), ``M[(c,i),(k,j)] = W[k,c,i,j]``
  = U S V^T; ``W1[r,c,i,0] = (U_r sqrt(S_r))[(c,i),r]`` is a kh x 1 Conv (vertical stride, pads
  and dilation) and ``W2[k,r,0,j] = (sqrt(S_r) V_r^T)[r,(k,j)]`` a 1 x kw Conv (horizontal
  ones, and the bias). Exact at full rank because zero padding commutes with the split.
* **Gemm / MatMul** with a constant weight: ``alpha * op(A) op(B) + beta * C`` with
  ``W = alpha * op(B)^T`` -> ``Gemm(A, W1^T, transA) -> Gemm(., W2^T, C, beta)`` (MatMul:
  two MatMuls).

Data-aware (``--calib``): with the layer's input patches A (im2col rows sampled from real
activations) and ``Sigma = A^T A / n = L L^T``, the output error is ``||A (W - W_r)^T|| =
||(W - W_r) L||``, so the rank-r factors come from the SVD of ``W L`` (``W1 = sqrt(S_r) V_r^T
L^-1``) and the rank is chosen from the *output* error; the second factor is then refitted by
least squares ``W2 = argmin ||Z W2^T - A W^T||`` with ``Z = A W1^T``. Spatial SVD whitens with
the covariance of the kh x 1 column patches and its output error is measured on the data.

Rank: one of ``sigma_threshold`` (keep sigma >= a * sigma_max), ``energy``
(keep that fraction of sum sigma^2, i.e. 1 - relative error^2), ``max_error`` (relative error
of the weights, or of the outputs with calib), ``rank_ratio`` or ``mac_ratio`` (per-layer MAC
budget). With ``form=auto`` each layer gets the form with fewer MACs at that criterion (at a
MAC budget: the smaller error). A layer is rewritten only if MACs and parameters both drop.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.graph import all_names, initializers, set_provenance, unique_name, value_shapes

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._lowrank_factor import (allocate, energy_rank, factor, factored_error, factors,
                              image_spectrum, layer_output, rank_for, refit_second, round_rank,
                              spectrum)
from ._lowrank_layer import PASS, Layer, calibrate, candidate
from ._toolkit import ancestors, bias_vector, producers, relative_error, splice

CRITERIA = ("sigma_threshold", "energy", "max_error", "rank_ratio", "mac_ratio",
            "model_mac_ratio")
# The default (no criterion set) is for --calib only: 99.9 % of the *output* energy per layer
# (0.0 points, 1.1x MACs, 1.6x smaller on the bundled Fashion-MNIST CNN; 0.95: -13.3 points)
DEFAULT_ENERGY = 0.999


@dataclass(frozen=True)
class LowRankConfig:
    # rank criterion: set one (none set: energy=0.999, needs --calib)
    sigma_threshold: float | None = None  # drop sigma < a * sigma_max
    energy: float | None = None           # keep this fraction of sum(sigma^2)
    max_error: float | None = None        # max relative error (weights; outputs with calib)
    rank_ratio: float | None = None       # rank = ceil(ratio * full rank)
    mac_ratio: float | None = None        # per-layer MACs after <= ratio * before
    model_mac_ratio: float | None = None  # all candidates' MACs after <= ratio * before,
    #                                       ranks allocated across layers (least total error)
    form: Literal["auto", "weight", "spatial"] = "auto"
    data_aware: bool = True      # use --calib activations when given
    refit: bool = True           # least-squares refit of the second factor (with calib)
    refit_bias: bool = True      # ... and of the bias (absorbs the mean shift)
    sequential: bool = True      # refit on the inputs the rewritten layers above produce
    calib_samples: int = 512     # calibration rows (images) used at most
    calib_rows: int = 4096       # im2col rows sampled per layer
    ridge: float = 1e-4          # Tikhonov term, relative to the mean input energy
    round_to: int = 1            # round ranks up to a multiple (SIMD width)
    min_macs: int = 0            # leave layers with fewer MACs per sample alone
    conv: bool = True
    gemm: bool = True
    include: tuple[str, ...] = ()  # only these nodes (names), if given
    exclude: tuple[str, ...] = ()
    spectra: bool = True         # singular values (weights and, with calib, im2col) in report
    force: bool = False          # rewrite even where MACs/params do not drop (experiments)

    def __post_init__(self):
        for k in ("sigma_threshold", "rank_ratio", "mac_ratio", "max_error", "model_mac_ratio"):
            v = getattr(self, k)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"{k} must be within [0, 1], got {v}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise ValueError(f"energy must be within (0, 1], got {self.energy}")
        if sum(getattr(self, k) is not None for k in CRITERIA) > 1:
            set_ = [k for k in CRITERIA if getattr(self, k) is not None]
            raise ValueError(f"set only one rank criterion, got {', '.join(set_)}")
        if self.round_to < 1 or self.calib_rows < 16 or self.calib_samples < 1:
            raise ValueError("round_to >= 1, calib_rows >= 16 and calib_samples >= 1 required")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")

    def criterion(self) -> tuple[str, float]:
        for k in CRITERIA:
            if getattr(self, k) is not None:
                return k, float(getattr(self, k))
        return "energy", DEFAULT_ENERGY


def _plot(report: dict, out_dir):
    import matplotlib.pyplot as plt

    spectra = report.get("details", {}).get("spectra", {})
    paths = []
    for key, title, fname in (
            ("weight", "weight matrices (K x C*kh*kw)", "lowrank_weight_spectra.png"),
            ("image", "im2col activation (image) matrices, calibration data",
             "lowrank_image_spectra.png")):
        series = {k: v[key] for k, v in spectra.items() if v.get(key)}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, pts in series.items():
            idx = np.array([p[0] for p in pts], dtype=float)
            val = np.array([p[1] for p in pts], dtype=float)
            ax.semilogy(idx / idx.max(), val / max(val.max(), 1e-30), label=name, lw=1)
        ax.set_ylim(1e-6, 1.5)  # below ~1e-6: round-off, or fewer sampled rows than columns
        ax.set_xlabel("singular value index / full rank")
        ax.set_ylabel("sigma / sigma_max")
        ax.set_title(f"singular-value decay: {title}")
        ax.grid(True, which="both", alpha=0.3)
        if len(series) <= 24:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


@register_pass(PASS, LowRankConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.9),
               plot=_plot)
def lowrank(model: onnx.ModelProto, config: LowRankConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport(PASS)
    crit, value = config.criterion()
    explicit = any(getattr(config, k) is not None for k in CRITERIA)
    if not explicit and not (ctx.calib and config.data_aware):
        # measured: the old data-free default (energy=0.95 of the weights) lost 13-23 points
        # on trained Fashion-MNIST CNNs; nothing data-free is near-lossless and still pays
        raise EdgecError("lowrank: no rank setting and no calibration data: give --calib "
                         "FILE.npz (default: a conservative output-energy rank), or a rank "
                         "setting (e.g. --set lowrank.model_mac_ratio=0.5; check the result), "
                         "or search one with --max-drop")
    layers = _select(m, config, report)
    use_data = bool(ctx.calib) and config.data_aware and bool(layers)
    rows = calibrate(m, list(enumerate(layers)), ctx.calib, config, ctx.seed) \
        if use_data else {}
    rows = {k: v for k, v in rows.items() if len(v) >= 16}
    # 1. factor every layer in every applicable form (symmetric: original inputs)
    plans = []
    for L in layers:
        forms = L.forms(config.form)
        if not forms:
            report.skip(L.node, f"form '{config.form}' does not apply to this layer "
                                f"(kernel {list(L.W.shape[2:])})")
            continue
        A = rows.get(L.node.name)
        plans.append((L, [factor(L, form, A, None, config) for form in forms]))
    # 2. choose form and rank per layer
    choice = _choose(plans, crit, value, config)
    # 3. fit the chosen factors in graph order
    fit = _Fit(m, {L.node.name: i for i, L in enumerate(layers)}, rows, config, ctx, report)
    for L, facts in plans:
        fit.layer(L, facts, *choice[L.node.name], crit, value)
    report.details = {"criterion": {crit: value}, "data_aware": bool(rows), "layers": fit.table,
                      "calib_rows": {k: len(v) for k, v in rows.items()}}
    if config.spectra:
        report.details["spectra"] = fit.spectra
    if not fit.new_nodes:
        return m, report
    return _with_rewrites(m, fit.new_nodes, fit.new_inits), report


def _select(m, config: LowRankConfig, report: PassReport) -> list[Layer]:
    """The layers to factorize; every other candidate is reported with the reason."""
    inits = initializers(m)
    shapes = value_shapes(m)
    layers: list[Layer] = []
    for node in m.graph.node:
        L, why = candidate(node, inits, shapes, config)
        if why:
            report.skip(node, why)
        elif L is not None:
            if L.macs() < config.min_macs:
                report.skip(node, f"{L.macs()} MACs per sample < lowrank.min_macs")
            else:
                layers.append(L)
    return layers


def _choose(plans, crit: str, value: float, config: LowRankConfig) -> dict:
    """Layer name -> (index of the chosen form's factorization, rank)."""
    if crit == "model_mac_ratio":
        return allocate(plans, value, config.round_to)
    choice = {}
    for L, facts in plans:
        opts = []
        for i, f in enumerate(facts):
            r = round_rank(rank_for(L, f, crit, value), len(f.S), config.round_to)
            opts.append((L.form_macs(f.form, r), float(f.err[r - 1]), i, r))
        key = (lambda o: (o[1], o[0])) if crit == "mac_ratio" else (lambda o: o[:2])
        _, _, i, r = min(opts, key=key)
        choice[L.node.name] = (i, r)
    return choice


class _Fit:
    """Fits the chosen factors layer by layer, in graph order: with calib and ``sequential``,
    each layer's second factor is refitted on the inputs the already-rewritten layers above
    produce. Collects the new nodes, the report table and the spectra."""

    def __init__(self, m, index: dict, rows: dict, config: LowRankConfig, ctx: PassContext,
                 report: PassReport):
        self.m, self.index, self.rows, self.config, self.ctx = m, index, rows, config, ctx
        self.report = report
        self.inits = initializers(m)
        self.names = all_names(m)
        self.producer = producers(m)
        self.table: list[dict] = []
        self.spectra: dict = {}
        self.new_nodes: dict[str, list[onnx.NodeProto]] = {}
        self.new_inits: list[onnx.TensorProto] = []

    def _spectra(self, L: Layer, A) -> dict:
        """Singular values of the weight (and im2col) matrix into the report; returns the
        fraction of each matrix's rank that 99 % of its energy needs."""
        if not self.config.spectra:
            return {}
        sv = {"weight": np.linalg.svd(L.matrix("weight"), compute_uv=False)}
        if A is not None:
            sv["image"] = image_spectrum(A)
        self.spectra[L.node.name] = {k: spectrum(v) for k, v in sv.items()}
        return {k: round(energy_rank(v, 0.99) / len(v), 4) for k, v in sv.items()}

    def layer(self, L: Layer, facts: list, i, r, crit: str, value: float) -> None:
        config, report = self.config, self.report
        params0, macs0 = int(L.W.size), L.macs()
        A = self.rows.get(L.node.name)
        energy99 = self._spectra(L, A)
        extra = {"rank_fraction_for_99pct_energy": energy99} if energy99 else {}
        if i is None:  # global allocation left it alone
            report.skip(L.node, "the model MAC budget is met more cheaply elsewhere")
            self.table.append({"node": L.node.name, "op": L.node.op_type, "form": None,
                               "macs_before": macs0, "macs_after": macs0,
                               "params_before": params0, "params_after": params0,
                               "skipped": "budget met elsewhere", **extra})
            return
        f = facts[i]
        macs, params1 = L.form_macs(f.form, r), L.form_params(f.form, r)
        row = {"node": L.node.name, "op": L.node.op_type, "form": f.form, "rank": r,
               "full_rank": len(f.S), "macs_before": macs0, "macs_after": macs,
               "params_before": params0, "params_after": params1,
               "error": round(float(f.err[r - 1]), 5),
               "error_of": "outputs" if f.data else "weights",
               "candidates": {g.form: {"rank": round_rank(rank_for(L, g, crit, value), len(g.S),
                                                          config.round_to)
                                       if crit != "model_mac_ratio" else None,
                                       "error_at_rank": round(float(g.err[min(r, len(g.S)) - 1]),
                                                              5)}
                              for g in facts}, **extra}
        if (macs >= macs0 or params1 >= params0) and not config.force:
            why = (f"rank {r} of {len(f.S)} ({f.form} form) would not reduce "
                   f"{'MACs' if macs >= macs0 else 'parameters'} ({macs} vs {macs0} MACs, "
                   f"{params1} vs {params0} params)")
            report.skip(L.node, why, rank=r, form=f.form)
            row["skipped"] = why
            self.table.append(row)
            return
        M = L.matrix(f.form)
        Wr = (f.U[:, :r] * f.S[:r]) @ f.V[:r]
        row["weight_error"] = round(relative_error(
            Wr.T if (L.kind != "conv" or f.form == "weight") else Wr, M), 5)
        f, W1, W2, bias_shift = self._fit(L, f, r, A, row)
        nodes, inits_ = _rewrite(L, f.form, r, W1, W2, bias_shift, self.inits, self.names)
        self.new_nodes[L.node.name] = nodes
        self.new_inits += inits_
        report.rewrite(L.node, f"{f.form} SVD rank {r}/{len(f.S)}: {macs0} -> {macs} MACs",
                       form=f.form, rank=r)
        self.table.append(row)

    def _fit(self, L: Layer, f, r: int, A, row: dict):
        """(factorization, W1, W2, bias shift) at rank r; with calibration rows A the output
        errors go into ``row`` and the second factor is refitted where that helps."""
        config = self.config
        if A is None:
            W1, W2 = factors(L, f, r)
            return f, W1, W2, None
        Y = layer_output(L, A)
        X = A
        upstream = ancestors(L.node, self.producer) & set(self.new_nodes)
        if config.sequential and upstream:
            cur = _with_rewrites(self.m, self.new_nodes, self.new_inits)
            X = calibrate(cur, [(self.index[L.node.name], L)], self.ctx.calib, config,
                          self.ctx.seed)[L.node.name]
            f = factor(L, f.form, X, Y, config)
            row["sequential"] = True
        W1, W2 = factors(L, f, r)
        bias_shift = None
        e_before = factored_error(L, f.form, W1, W2, X, Y)
        row["output_error"] = round(e_before, 5)
        if config.refit:
            W2_fit, db, e_after = refit_second(L, f.form, W1, W2, X, Y, config.ridge,
                                               with_bias=config.refit_bias)
            row["output_error_refit"] = round(e_after, 5)
            if e_after < e_before:  # keep the refit only where it helps
                W2, bias_shift = W2_fit, db
        return f, W1, W2, bias_shift


def _with_rewrites(m: onnx.ModelProto, new_nodes: dict, new_inits: list) -> onnx.ModelProto:
    out = copy_model(m)
    splice(out, new_nodes, new_inits)
    return out


def _rewrite(L: Layer, form: str, r: int, W1, W2, bias_shift, inits, names: set[str]):
    node = L.node
    base = node.name or node.output[0]
    mid = unique_name(names, f"{base}_lowrank_mid")
    w1n = unique_name(names, f"{base}_lowrank_w1")
    w2n = unique_name(names, f"{base}_lowrank_w2")
    dt = L.dtype
    new = [numpy_helper.from_array(np.ascontiguousarray(W1).astype(dt), w1n),
           numpy_helper.from_array(np.ascontiguousarray(W2).astype(dt), w2n)]
    bias, beta = L.bias, L.beta
    if bias_shift is not None and np.any(bias_shift != 0):
        b0 = bias_vector(inits, bias, beta, L.W.shape[0])
        bias = unique_name(names, f"{base}_lowrank_bias")
        beta = 1.0
        new.append(numpy_helper.from_array((b0 + bias_shift).astype(dt), bias))
    n1name = unique_name(names, f"{base}/lowrank_a")
    n2name = unique_name(names, f"{base}/lowrank_b")
    if L.kind == "conv":
        pt, pl, pb, pr = L.pads
        sh, sw = L.strides
        dh, dw = L.dils
        kh, kw = L.W.shape[2:]
        if form == "weight":
            a1 = dict(kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
                      pads=[pt, pl, pb, pr])
            a2 = dict(kernel_shape=[1, 1])
        else:
            a1 = dict(kernel_shape=[kh, 1], strides=[sh, 1], dilations=[dh, 1],
                      pads=[pt, 0, pb, 0])
            a2 = dict(kernel_shape=[1, kw], strides=[1, sw], dilations=[1, dw],
                      pads=[0, pl, 0, pr])
        n1 = helper.make_node("Conv", [node.input[0], w1n], [mid], name=n1name, **a1)
        n2 = helper.make_node("Conv", [mid, w2n] + ([bias] if bias else []), [node.output[0]],
                              name=n2name, **a2)
        out = [n1, n2]
    elif L.kind == "gemm":
        n1 = helper.make_node("Gemm", [node.input[0], w1n], [mid], name=n1name,
                              transA=L.trans_a)
        n2 = helper.make_node("Gemm", [mid, w2n] + ([bias] if bias else []), [node.output[0]],
                              name=n2name, **({"beta": beta} if bias and beta != 1.0 else {}))
        out = [n1, n2]
    else:
        n1 = helper.make_node("MatMul", [node.input[0], w1n], [mid], name=n1name)
        if bias and bias != L.bias:
            mid2 = unique_name(names, f"{base}_lowrank_mid2")
            n2 = helper.make_node("MatMul", [mid, w2n], [mid2], name=n2name)
            n3 = helper.make_node("Add", [mid2, bias], [node.output[0]],
                                  name=unique_name(names, f"{base}/lowrank_bias"))
            out = [n1, n2, n3]
        else:
            n2 = helper.make_node("MatMul", [mid, w2n], [node.output[0]], name=n2name)
            out = [n1, n2]
    for n, part in zip(out, ("first", "second", "bias")):
        set_provenance(n, PASS, base, form=form, rank=r, factor=part)
    return out, new
