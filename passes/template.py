"""template: replace learned 3x3 conv filters by fixed binary templates (HLAC or LBC); calib refit.

Seed 002: early conv layers learn edge/blob detectors; part of them can be fixed binary
template filters that need no multiplications (the kernel adds and subtracts input pixels,
sums shared between masks computed once, and scales once per output).

What a template filter is here. For a conv with C input channels, template filter k is
``alpha_k * T_k`` with ``T_k[c] = s_{k,c} M_k`` -- one 0/1 mask ``M_k`` of the bank for every
input channel, a fixed sign ``s_{k,c}`` in {-1, 0, +1} per input channel (channels the
filter barely reads get 0), and ONE scale ``alpha_k`` per filter: all taps of T are 0/±1 and
the only multiply is the scale, once per output. (With C = 1, as in a first conv on grey
images, ``T_k = ±M_k``.) The seed fixes the scale to ±3/sqrt(fan_in) and lets training adapt
the rest; without retraining the pass instead fits ``alpha_k`` by least squares (reported
with the seed's scale, ``seed_scale = 3/sqrt(C*9)``). The stored weight is ``alpha_k * T_k``
as float (the model runs in onnxruntime; ``W[k] / alpha_k`` is exactly 0/±1).

* ``bank=hlac``: the 25 HLAC masks of the 3x3 window (see ``_template_bank``), each usable
  once, at any placement in the window, with the per-channel signs chosen per filter.
* ``bank=lbc``: ``bank_size`` random sparse ±1 filters over the whole C x 3 x 3 patch
  (``sparsity``: fraction of zero taps), seeded; each usable once, only alpha is fitted.

Which filters: the error of filter k as template j is ``||w_k - alpha T||_H / ||w_k||_H``
(H = I without calibration; with ``--calib`` the second moments of the layer's im2col rows,
so the error is the filter's output error). Filters and templates are matched one-to-one by
minimum total error (``linear_sum_assignment``); ``count`` filters are replaced (the
best-matched ones), or, without ``count``, every matched filter whose error is at most
``max_error``. With calibration the replaced filters' bias absorbs the mean output shift
(``bias_correct``), and every layer reading the template layer (the first Conv/Gemm/MatMul
with a constant weight on each path from it) is refitted by ridge least squares from the
template model's activations to the original model's outputs (``refit``: the prune pass's
reconstruction, applied where held-out rows get closer).

Report per layer: filters replaced (template, error, alpha), trainable parameters before and
after (the layer's weights; after = learned filters' weights + one scale per template, and
without the scales -- the seed's count, 864 -> 189 for 25 of 32 filters over 3 channels),
``multiplies_dense`` and ``multiplies_template`` (learned filters' MACs + one scale per
template output), ``distinct_products`` (see ``_cluster_common``) and the readers' error
before/after the refit.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from scipy.optimize import linear_sum_assignment

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._cluster_common import Writer, distinct_products, multiplies_dense, out_pixels, select
from ._lowrank_layer import calibrate
from ._prune_refit import reconstruct
from ._sparse_obs import output_error
from ._template_bank import fit_bank, fit_hlac, lbc_bank, scale
from ._toolkit import bias_vector

PASS = "template"
READER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class TemplateConfig:
    layers: tuple[str, ...] = ()        # conv nodes to rewrite (default: the first 3x3 conv)
    bank: Literal["hlac", "lbc"] = "hlac"
    count: int | None = None            # filters replaced per layer (None: all under max_error)
    max_error: float = 0.6              # count=None: relative filter error allowed
    bank_size: int = 25                 # bank=lbc: templates drawn
    sparsity: float = 0.5               # bank=lbc: fraction of zero taps
    data_aware: bool = True             # H-weighted errors and scales with --calib
    bias_correct: bool = True           # ... replaced filters' bias absorbs the mean shift
    refit: bool = True                  # ... readers refitted by least squares
    calib_samples: int = 512            # calibration images used at most
    calib_rows: int = 4096              # im2col rows sampled per layer / reader
    ridge: float = 1e-7                 # reader refit Tikhonov term (relative)

    def __post_init__(self):
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not (0.0 <= self.max_error):
            raise ValueError(f"max_error must be >= 0, got {self.max_error}")
        if self.bank not in ("hlac", "lbc"):
            raise ValueError(f"bank must be hlac or lbc, got '{self.bank}'")
        if self.bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {self.bank_size}")
        if not (0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be within [0, 1) (fraction of zero taps), got "
                             f"{self.sparsity}")
        if self.calib_rows < 16 or self.calib_samples < 1 or self.ridge < 0:
            raise ValueError("calib_rows >= 16, calib_samples >= 1 and ridge >= 0 required")


@register_pass(PASS, TemplateConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.5))
def template(model: onnx.ModelProto, config: TemplateConfig, ctx: PassContext):
    from edgec.core.importer import infer_shapes

    m = copy_model(model)
    report = PassReport(PASS)
    sel = types.SimpleNamespace(include=config.layers, exclude=(), min_weights=0)
    cands = select(m, sel, report, PASS, ops=("Conv",))
    targets = []
    for t in cands:
        if t.stored.shape[2:] != (3, 3):
            report.skip(t.L.node, f"{t.stored.shape[2]}x{t.stored.shape[3]} kernel: templates "
                        "are 3x3")
        elif not config.layers and targets:
            report.skip(t.L.node, "not the first 3x3 conv (template.layers picks others)")
        else:
            targets.append(t)
    data = bool(ctx.calib) and config.data_aware and bool(targets)
    rows = {}
    if data:
        got = calibrate(m, list(enumerate(t.L for t in targets)), ctx.calib, config, ctx.seed)
        rows = {k: v.reshape(len(v), -1).astype(np.float64) for k, v in got.items()
                if len(v) >= 16}
    w = Writer(m, PASS)
    table = []
    for li, t in enumerate(targets):
        X = rows.get(t.name)
        row, Wn, bias = _layer(m, t, li, X, ctx.seed, config)
        if Wn is None:
            report.skip(t.L.node, row["why"])
            continue
        w.set_input(t.name, 1, t.to_stored(Wn), "template", "filters replaced by templates",
                    bank=config.bank, replaced=row["filters_replaced"])
        if bias is not None:
            w.set_input(t.name, 2, bias.astype(t.stored.dtype), "template",
                        "filters replaced by templates; bias corrected")
        report.rewrite(t.L.node, f"{row['filters_replaced']}/{row['filters']} filters "
                       f"replaced by {config.bank} templates",
                       **{k: v for k, v in row.items() if k not in ("node", "op")})
        table.append(row)
    report.details = {"bank": config.bank, "method": "data-aware" if data else "weights",
                      "layers": table, "reconstruction": []}
    if not report.modified:
        return m, report
    m = w.finish()
    if ctx.calib is not None and config.refit:
        done = {r["node"] for r in table}
        refit = []
        for r in table:
            for node, why in _readers(m, r["node"]):
                if why is None and node.name in done:
                    why = "itself a template layer (its templates are kept)"
                if why:
                    report.details["reconstruction"].append({"node": node.name,
                                                             "skipped": why})
                elif all(node.name != x[0].name for x in refit):
                    refit.append((node, node.input[0], None))
        if refit:
            m = reconstruct(infer_shapes(model), m, refit, {}, ctx, config, report)
    return m, report


def _layer(m, t, li: int, X, seed: int, config: TemplateConfig):
    """(report row, new weight matrix or None, new bias or None) of one conv layer."""
    W = t.Wm                                   # [K, C*9]
    K, n = W.shape
    C = n // 9
    H = X.T @ X / len(X) if X is not None else np.eye(n)
    if config.bank == "hlac":
        err, tmpl = fit_hlac(W, H)
        names = [f"hlac{j}" for j in range(err.shape[1])]
    else:
        T = lbc_bank(config.bank_size, C, config.sparsity, seed, li)
        err, tmpl = fit_bank(W, H, T)
        names = [f"lbc{j}" for j in range(len(T))]
    nb = err.shape[1]
    want = min(K, nb) if config.count is None else min(config.count, K, nb)
    row = {"node": t.name, "op": "Conv", "bank": config.bank, "filters": K,
           "input_channels": C, "templates_available": nb,
           "error_of": "outputs (calib H)" if X is not None else "weights"}
    if config.count is not None and config.count > min(K, nb):
        row["count_clamped"] = f"count={config.count} > min(filters {K}, templates {nb})"
    if want == 0:
        row["why"] = "count=0: no filter replaced"
        return row, None, None
    cost = np.concatenate([err, np.zeros((K, K - want))], axis=1)
    fr, to = linear_sum_assignment(cost)
    pairs = sorted([(err[k, j], k, j) for k, j in zip(fr, to) if j < nb])[:want]
    if config.count is None:
        pairs = [p for p in pairs if p[0] <= config.max_error]
    if not pairs:
        row["why"] = f"no filter within template.max_error={config.max_error} of a template " \
                     f"(best {float(err.min()):.3f})"
        return row, None, None
    Wn = W.copy()
    tau = 3.0 / np.sqrt(n)
    replaced = []
    for e, k, j in sorted(pairs, key=lambda p: p[1]):
        Tk = tmpl[k][j]
        a = scale(W[k], Tk, H)
        Wn[k] = a * Tk
        replaced.append({"filter": int(k), "template": names[j], "error": round(float(e), 5),
                         "alpha": float(np.float32(a)), "alpha_over_seed_scale":
                         round(float(a / tau), 5), "taps": int(np.count_nonzero(Tk)),
                         "channels": int(np.count_nonzero(Tk.reshape(C, 9).any(1)))})
    ks = np.array([r["filter"] for r in replaced])
    Wn = Wn.astype(t.stored.dtype).astype(np.float64)
    bias = None
    if X is not None and config.bias_correct:
        mu = X.mean(axis=0)
        node = t.L.node
        inits = {x.name: x for x in m.graph.initializer}
        bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bname is None or bname in inits:
            bias = bias_vector(inits, bname, 1.0, K).copy()
            bias[ks] += (W[ks] - Wn[ks]) @ mu
    learned = K - len(ks)
    P = out_pixels(t)
    dense = multiplies_dense(t)
    mult = learned * n * P + len(ks) * P
    keep = np.setdiff1d(np.arange(K), ks)
    prods = distinct_products(t, Wn, keep) + len(ks) * P
    row.update(filters_replaced=len(ks), replaced=replaced, seed_scale=round(float(tau), 6),
               mean_filter_error=round(float(np.mean([r["error"] for r in replaced])), 5),
               layer_output_error=round(output_error(W, Wn, H), 6),
               trainable_params_before=int(W.size),
               trainable_params_after=int(learned * n + len(ks)),
               trainable_params_after_without_scales=int(learned * n),
               multiplies_dense=dense, multiplies_template=int(mult),
               multiplies_fraction=round(mult / max(dense, 1), 6),
               template_adds_per_output=round(float(np.mean([r["taps"] for r in replaced])), 2),
               distinct_products=int(prods),
               distinct_products_fraction=round(prods / max(dense, 1), 6))
    return row, Wn, bias


def _readers(m, name: str) -> list[tuple[onnx.NodeProto, str | None]]:
    """The first Conv/Gemm/MatMul on each path from node ``name``'s output, with the reason
    one cannot be refitted (None: it can)."""
    from ._toolkit import producers

    readers: dict[str, list] = {}
    for n in m.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    inits = {x.name for x in m.graph.initializer}
    prod = producers(m)
    start = next(n for n in m.graph.node if n.name == name)
    out, seen, stack = [], set(), list(start.output)
    while stack:
        x = stack.pop()
        for n in readers.get(x, []):
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in READER_OPS and len(n.input) > 1 and n.input[0] == x and \
                    (n.input[1] in inits or
                     (n.input[1] in prod and prod[n.input[1]].op_type == "Constant")):
                why = None
                if n.input[1] not in inits:
                    why = "weight is a Constant node, not an initializer"
                elif n.op_type == "Conv" and n.attribute and \
                        any(a.name == "group" and a.i != 1 for a in n.attribute):
                    why = "grouped conv"
                elif n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in
                                                 n.attribute):
                    why = "Gemm with transA"
                out.append((n, why))
            else:
                stack += list(n.output)
    return out


__all__ = ["TemplateConfig", "template"]
