"""quantize: static int8 post-training quantization in QDQ form (per-channel weights, calibrated activations).

Algebra. A tensor x is represented by ``q = clamp(round(x / s) + z, qmin, qmax)`` and read
back as ``x~ = s * (q - z)`` (QuantizeLinear / DequantizeLinear). For a Conv or Gemm/MatMul
with weight W and bias b reading activation x:

    y = W x + b  ->  y = DQ(W_q; s_w[k], 0) DQ(Q(x; s_x, z_x)) + DQ(b_q; s_x * s_w[k], 0)

* weights: int8, symmetric, one scale per output channel k: ``s_w[k] = c_k / 127`` with the
  clip c_k = max|W_k| (``weight_method=minmax``) or the c_k minimising ``sum (W_k - W~_k)^2``
  over a grid (``mse``: clips outliers where that lowers the error); stored as int8;
* activations: one (s, z) per tensor, uint8 (default) or int8, asymmetric, from the *observed*
  calibration distribution: ``minmax``, ``percentile`` (clip at the p-th percentile),
  ``entropy`` (the clip range whose 8-bit histogram has the least KL divergence from the
  observed one, as TensorRT does) or ``mse`` (the clip range with the least expected squared
  quantization error, clipping plus rounding, under the observed histogram);
* biases: int32 with scale ``s_x * s_w[k]`` and zero point 0.

Quantized activations are the inputs of quantized Conv/Gemm/MatMul nodes, so a Relu/Clip before
a conv is fused into its range (the observed minimum is 0) and a MaxPool output keeps its
input's scale (max commutes with a monotonic quantizer). ``exclude`` keeps nodes in float;
``sensitivity`` reports the output error of each layer quantized alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.errors import EdgecError
from edgec.graph import all_names, attr, initializers, set_provenance, unique_name

from . import PassContext, PassReport, Tolerance, copy_model, register_pass

PASS = "quantize"
BINS = 2048


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["int8"] = "int8"
    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.99        # for method=percentile
    weight_method: Literal["minmax", "mse"] = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = True
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
    exclude: tuple[str, ...] = ()    # node names kept in float
    sensitivity: bool = False        # output error of each layer quantized alone
    calib_samples: int = 512
    progress: bool = True            # a progress bar on a terminal

    def __post_init__(self):
        if not (50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be within (50, 100], got {self.percentile}")
        bad = [o for o in self.ops if o not in ("Conv", "Gemm", "MatMul")]
        if bad:
            raise ValueError(f"ops: cannot quantize {', '.join(bad)} (Conv, Gemm, MatMul)")
        if self.calib_samples < 1:
            raise ValueError("calib_samples must be >= 1")


# ----------------------------------------------------------------------------- weights

def weight_scales(w: np.ndarray, axis: int, method: str = "minmax",
                  per_channel: bool = True) -> np.ndarray:
    """Symmetric int8 scales, one per slice along ``axis`` (or one for the tensor)."""
    w = np.asarray(w, dtype=np.float64)
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
    amax = np.abs(wc).max(axis=1)
    if method == "mse":
        best = amax.copy()
        best_err = np.full(len(amax), np.inf)
        for f in np.linspace(0.5, 1.0, 51):
            c = np.maximum(amax * f, 1e-12)[:, None]
            s = c / 127.0
            err = ((np.clip(np.round(wc / s), -127, 127) * s - wc) ** 2).sum(axis=1)
            better = err < best_err
            best[better], best_err[better] = (amax * f)[better], err[better]
        amax = best
    return np.maximum(amax, 1e-12) / 127.0


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = -1
    s = scales.reshape(shape) if len(scales) > 1 else scales.reshape(())
    return np.clip(np.round(w / s), -127, 127).astype(np.int8)


# ----------------------------------------------------------------------------- activations

class Observer:
    """Running min/max and (second pass) a histogram of one tensor's values."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf
        self.hist = None

    def update_range(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def update_hist(self, x: np.ndarray) -> None:
        lo, hi = self.edges()
        h, _ = np.histogram(x, bins=BINS, range=(lo, hi))
        self.hist = h.astype(np.float64) if self.hist is None else self.hist + h

    def edges(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        return lo, hi


def qrange(dtype: str) -> tuple[int, int]:
    return (0, 255) if dtype == "uint8" else (-128, 127)


def scale_zero_point(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """Asymmetric (s, z) covering [min(lo, 0), max(hi, 0)] so that 0 is exact."""
    qmin, qmax = qrange(dtype)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max((hi - lo) / (qmax - qmin), 1e-12)
    z = int(np.clip(round(qmin - lo / s), qmin, qmax))
    return s, z


def _centers(lo: float, hi: float, n: int) -> np.ndarray:
    w = (hi - lo) / n
    return lo + w * (np.arange(n) + 0.5)


def _range_percentile(hist, lo, hi, p) -> tuple[float, float]:
    c = np.cumsum(hist) / max(hist.sum(), 1e-30)
    edges = np.linspace(lo, hi, len(hist) + 1)
    a = edges[np.searchsorted(c, (100 - p) / 100.0)] if lo < 0 else 0.0
    b = edges[min(np.searchsorted(c, p / 100.0) + 1, len(hist))]
    return float(min(a, 0.0)), float(max(b, 0.0))


def _candidates(hist, lo, hi, n=64):
    """Shrinking clip ranges [lo*f, hi*f] (one-sided when the tensor has one sign)."""
    return [(lo * f, hi * f) for f in np.linspace(1.0 / n, 1.0, n)]


def _quant_error(hist, lo, hi, a, b, dtype) -> float:
    """Expected squared error of quantizing the histogram's values with range [a, b]."""
    x = _centers(lo, hi, len(hist))
    s, z = scale_zero_point(a, b, dtype)
    qmin, qmax = qrange(dtype)
    xq = (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s
    return float(np.sum(hist * (x - xq) ** 2))


def _range_mse(hist, lo, hi, dtype) -> tuple[float, float]:
    return min(_candidates(hist, lo, hi), key=lambda ab: _quant_error(hist, lo, hi, *ab, dtype))


def _kl(hist, lo, hi, a, b, levels=256) -> float:
    """KL(P || Q) as TensorRT computes it: P = the histogram clipped to [a, b] with the
    outliers folded into the edge bins; Q = the clipped histogram *without* the outliers,
    merged into ``levels`` quantization bins and spread back over its non-empty bins. A
    narrow range loses the folded mass from Q, a wide one loses resolution."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    i0 = max(int(np.searchsorted(edges, a, side="right")) - 1, 0)
    i1 = min(int(np.searchsorted(edges, b, side="left")), len(hist))
    if i1 - i0 < levels // 2:
        return np.inf
    raw = hist[i0:i1]
    p = raw.copy()
    p[0] += hist[:i0].sum()
    p[-1] += hist[i1:].sum()
    q = np.zeros_like(p)
    for g in np.array_split(np.arange(len(p)), min(levels, len(p))):
        nz = g[raw[g] > 0]
        if len(nz):
            q[nz] = raw[g].sum() / len(nz)
    p = p / max(p.sum(), 1e-30)
    q = q / max(q.sum(), 1e-30)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def _range_entropy(hist, lo, hi) -> tuple[float, float]:
    best = min(_candidates(hist, lo, hi, 128), key=lambda ab: _kl(hist, lo, hi, *ab))
    return best


def activation_range(obs: Observer, method: str, percentile: float, dtype: str
                     ) -> tuple[float, float]:
    lo, hi = obs.edges()
    if method == "minmax" or obs.hist is None:
        return lo, hi
    if method == "percentile":
        return _range_percentile(obs.hist, lo, hi, percentile)
    if method == "mse":
        return _range_mse(obs.hist, lo, hi, dtype)
    return _range_entropy(obs.hist, lo, hi)


# ----------------------------------------------------------------------------- the pass

@dataclass
class Target:
    node: onnx.NodeProto
    x: str          # activation input
    w: str          # weight initializer
    axis: int       # output-channel axis of the weight
    bias: str | None


def _targets(m, inits, config, report) -> list[Target]:
    out = []
    for n in m.graph.node:
        if n.op_type not in config.ops:
            continue
        if n.name in config.exclude:
            report.skip(n, "in quantize.exclude (kept in float)")
            continue
        if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
            report.skip(n, "weight is not a constant (or the input is)")
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.dtype != np.float32:
            report.skip(n, f"weight dtype {w.dtype} (only float32 is quantized)")
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "Gemm":
            if attr(n, "transA", 0):
                report.skip(n, "Gemm with transA is kept in float")
                continue
            axis = 0 if attr(n, "transB", 0) else 1
        else:
            if w.ndim != 2:
                report.skip(n, f"MatMul weight of rank {w.ndim} is kept in float")
                continue
            axis = 1
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None and (bias not in inits or (n.op_type == "Gemm" and (
                attr(n, "beta", 1.0) != 1.0 or attr(n, "alpha", 1.0) != 1.0))):
            bias = "float"  # keep a non-constant or scaled bias in float
        out.append(Target(n, n.input[0], n.input[1], axis, bias))
    return out


def _observe(m, tensors: list[str], calib, config) -> dict[str, Observer]:
    from ._calib import calib_rows, fixed_batch, stream_activations

    total = min(calib_rows(calib), config.calib_samples)
    batch = fixed_batch(m) or 32
    obs = {t: Observer() for t in tensors}
    passes = ["range"] + (["hist"] if config.method != "minmax" else [])
    bar = None
    if config.progress:
        import sys

        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(passes) * math.ceil(total / batch), desc="calibrating",
                       unit="batch", leave=False)
    for what in passes:
        for acts in stream_activations(m, calib, tensors, batch=batch, limit=total):
            for t, x in acts.items():
                if what == "range":
                    obs[t].update_range(x)
                else:
                    obs[t].update_hist(x)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return obs


def _rewrite(m, targets: list[Target], params: dict, config, names) -> onnx.ModelProto:
    """Insert QuantizeLinear/DequantizeLinear for ``params`` {tensor: (s, z)} and replace the
    targets' weights and biases by int8/int32 initializers with DequantizeLinear."""
    m = copy_model(m)
    inits = initializers(m)
    qdt = np.uint8 if config.activation_type == "uint8" else np.int8
    new_nodes_before: dict[str, list] = {}
    new_inits = []
    dq_of: dict[str, str] = {}
    for t, (s, z) in params.items():
        sn = unique_name(names, f"{t}_scale")
        zn = unique_name(names, f"{t}_zero_point")
        qn = unique_name(names, f"{t}_quantized")
        dn = unique_name(names, f"{t}_dequantized")
        new_inits += [numpy_helper.from_array(np.array(s, np.float32), sn),
                      numpy_helper.from_array(np.array(z, qdt), zn)]
        q = helper.make_node("QuantizeLinear", [t, sn, zn], [qn],
                             name=unique_name(names, f"{t}/quantize"))
        d = helper.make_node("DequantizeLinear", [qn, sn, zn], [dn],
                             name=unique_name(names, f"{t}/dequantize"))
        for n in (q, d):
            set_provenance(n, PASS, t, scale=s, zero_point=z)
        new_nodes_before[t] = [q, d]
        dq_of[t] = dn
    table = []
    for tg in targets:
        node = next(n for n in m.graph.node if n.name == tg.node.name)
        w = numpy_helper.to_array(inits[tg.w]).astype(np.float64)
        sw = weight_scales(w, tg.axis, config.weight_method, config.per_channel)
        wq = quantize_weight(w, sw, tg.axis)
        wqn, wsn, wzn = (unique_name(names, f"{tg.w}_{s}") for s in ("int8", "scale", "zp"))
        wdn = unique_name(names, f"{tg.w}_dequantized")
        new_inits += [numpy_helper.from_array(wq, wqn),
                      numpy_helper.from_array(sw.astype(np.float32), wsn),
                      numpy_helper.from_array(np.zeros(len(sw), np.int8), wzn)]
        wd = helper.make_node("DequantizeLinear", [wqn, wsn, wzn], [wdn],
                              name=unique_name(names, f"{node.name}/weight_dequantize"),
                              **({"axis": tg.axis} if len(sw) > 1 else {}))
        set_provenance(wd, PASS, node.name, part="weight", method=config.weight_method)
        extra = [wd]
        sx, _ = params[tg.x]
        if tg.bias not in (None, "float"):
            b = numpy_helper.to_array(inits[tg.bias]).astype(np.float64).reshape(-1)
            sb = (sx * sw).astype(np.float32) if len(sw) == len(b) else \
                np.full(len(b), sx * sw[0], np.float32)
            bq = np.clip(np.round(b / sb.astype(np.float64)), -2 ** 31, 2 ** 31 - 1)
            bqn, bsn, bzn = (unique_name(names, f"{tg.bias}_{s}") for s in ("int32", "scale",
                                                                               "zp"))
            bdn = unique_name(names, f"{tg.bias}_dequantized")
            new_inits += [numpy_helper.from_array(bq.astype(np.int32), bqn),
                          numpy_helper.from_array(sb, bsn),
                          numpy_helper.from_array(np.zeros(len(sb), np.int32), bzn)]
            bd = helper.make_node("DequantizeLinear", [bqn, bsn, bzn], [bdn],
                                  name=unique_name(names, f"{node.name}/bias_dequantize"),
                                  axis=0)
            set_provenance(bd, PASS, node.name, part="bias")
            extra.append(bd)
            node.input[2] = bdn
        node.input[0] = dq_of[tg.x]
        node.input[1] = wdn
        set_provenance(node, PASS, node.name, quantized="int8")
        new_nodes_before.setdefault(f"@{node.name}", []).extend(extra)
        table.append({"node": node.name, "op": node.op_type, "input": tg.x,
                      "input_scale": sx, "input_zero_point": params[tg.x][1],
                      "weight_scale_min": float(sw.min()), "weight_scale_max": float(sw.max()),
                      "weight_error": float(np.linalg.norm(
                          quantize_weight(w, sw, tg.axis) * _bshape(sw, w.ndim, tg.axis) - w)
                          / max(np.linalg.norm(w), 1e-30))})
    # place each Q/DQ pair right after its tensor's producer (graph inputs: first), and the
    # weight/bias DequantizeLinear nodes right before their consumer
    producers = {o: n.name for n in m.graph.node for o in n.output}
    order = []
    for t in params:
        if t not in producers:
            order += new_nodes_before[t]
    for n in m.graph.node:
        order += new_nodes_before.get(f"@{n.name}", [])
        order.append(n)
        for o in n.output:
            if o in params:
                order += new_nodes_before[o]
    del m.graph.node[:]
    m.graph.node.extend(order)
    m.graph.initializer.extend(new_inits)
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m, table


def _bshape(s: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape) if len(s) > 1 else s.reshape(())


@register_pass(PASS, QuantizeConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.98),
               needs_calib=True)
def quantize(model: onnx.ModelProto, config: QuantizeConfig, ctx: PassContext):
    if ctx.calib is None:
        raise EdgecError("quantize.mode=int8 needs calibration data: give --calib FILE.npz")
    report = PassReport(PASS)
    m = copy_model(model)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node):
        for n in m.graph.node:
            if n.op_type in config.ops:
                report.skip(n, "the model is already quantized (QDQ nodes present)")
        return m, report
    inits = initializers(m)
    targets = _targets(m, inits, config, report)
    if not targets:
        return m, report
    tensors = list(dict.fromkeys(t.x for t in targets))
    obs = _observe(m, tensors, ctx.calib, config)
    params = {}
    ranges = {}
    for t in tensors:
        lo, hi = activation_range(obs[t], config.method, config.percentile,
                                  config.activation_type)
        params[t] = scale_zero_point(lo, hi, config.activation_type)
        ranges[t] = {"observed": [obs[t].lo, obs[t].hi], "clip": [lo, hi],
                     "scale": params[t][0], "zero_point": params[t][1]}
    names = all_names(m)
    out, table = _rewrite(m, targets, params, config, names)
    for row in table:
        report.rewrite(row["node"], f"int8 {row['op']}: weights per channel, input "
                                    f"s={row['input_scale']:.4g} z={row['input_zero_point']}")
    report.details = {"method": config.method, "weight_method": config.weight_method,
                      "activation_type": config.activation_type, "layers": table,
                      "activations": ranges}
    if config.sensitivity:
        report.details["sensitivity"] = _sensitivity(model, targets, params, config, ctx)
    return out, report


def _sensitivity(model, targets, params, config, ctx) -> list[dict]:
    """Each layer quantized alone: relative output error and top-1 agreement with the float
    model on (up to 256) calibration rows."""
    from ._calib import collect

    outs = [o.name for o in model.graph.output]
    feeds = {k: v[:256] for k, v in ctx.calib.items()}
    ref = collect(model, feeds, outs)
    rows = []
    for tg in targets:
        names = all_names(model)
        one, _ = _rewrite(model, [tg], {tg.x: params[tg.x]}, config, names)
        got = collect(one, feeds, outs)
        r, g = ref[outs[0]], got[outs[0]]
        row = {"node": tg.node.name, "output_error": float(
            np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))}
        if r.ndim == 2 and r.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(r.argmax(1) == g.argmax(1)))
        rows.append(row)
    rows.sort(key=lambda x: -x["output_error"])
    return rows
