"""quantize: int8 post-training quantization in QDQ form (per-channel weights, calibrated activations) or fp16.

Algebra (int8). A tensor x is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read
back as ``x~ = s * (q - z)`` (QuantizeLinear / DequantizeLinear, round half to even). For a
Conv or Gemm/MatMul with weight W and bias b reading activation x:

    y = W x + b  ->  y = DQ(W_q; s_w[k]) DQ(Q(x; s_x, z_x)) + DQ(b_q; s_x * s_w[k])

* weights: stored int8, symmetric, one scale per output channel k (Conv: axis 0; Gemm:
  axis 0 with transB=1, axis 1 without; MatMul: axis 1): ``s_w[k] = c_k / qmax`` with the clip
  ``c_k = max|W_k|`` (``weight_method=minmax``) or the ``c_k`` minimising the channel's
  ``||W_k - W~_k||^2`` (``mse``: clips a channel's outliers where that lowers its error);
  ``qmax = 127`` for 8-bit weights, ``63`` for 7-bit ones (``weight_bits=7``): on x86 CPUs
  without VNNI, 8-bit u8 x s8 products are summed in saturating 16-bit pairs (``vpmaddubsw``,
  what onnxruntime's QLinearConv/MatMulInteger run there), which is exact only while
  ``255 * (|w1| + |w2|) <= 32767``; 7-bit weights keep every pair sum in range, so the same
  model gives the exact answer in onnxruntime on any CPU, and edgec's kernels take their
  8-bit-operand form there. ``weight_bits=auto`` (the default) is 7 for a compile target
  whose CPU sums pairs that way and 8 otherwise (VNNI x86, Arm, GPUs, or no target);
* activations: one ``(s, z)`` per tensor, uint8 (default) or int8, asymmetric, from the
  *observed* calibration distribution (streamed in batches; a min/max pass, then a histogram
  pass): ``minmax``, ``percentile`` (clip at the p-th percentile), ``entropy`` (the range
  whose 8-bit re-binning has the least KL divergence from the observed histogram, TensorRT's
  method) or ``mse`` (the range with the least expected squared error, rounding + clipping);
* biases: int32 with scale ``s_x * s_w[k]``, zero point 0 (a channel whose bias would not fit
  gets a larger weight scale);
* ``bias_correction``: ``b'[k] = b[k] - sum (W~ - W)[k] E[x]`` with E[x] the per-channel mean
  of the calibration input, so the expected output of each layer does not move.

Quantized tensors are the activation inputs and outputs of the quantized ops (Conv, Gemm,
MatMul, MaxPool, Add, Concat). A Relu/Clip that is the only reader of a Conv/Gemm/MatMul/Add
output is fused: the Q/DQ goes after it (its range starts at 0). MaxPool and Flatten/Reshape
share their input's scale (max and reshapes commute with a monotonic quantizer), Concat inputs
and output share one scale. ``exclude`` keeps nodes in float; ``sensitivity`` reports, for
each layer quantized alone, the output error, top-1 agreement and (with labels) accuracy drop
versus the float model on the calibration rows.

Algebra (fp16): ``x -> fp16(x)`` for weights and activations, Cast nodes where a float32
tensor meets an fp16 one: at the graph inputs/outputs (``keep_io_types``) and around the ops
of ``block_ops``. ``compute=fp32`` (x86) only stores the weights in fp16, ``W = Cast(W16,
float)``, and computes in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.graph import all_names, attr, consumers, initializers, set_provenance, unique_name

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._quant_calib import (INT32_MAX, Observer, activation_range, dequantize_weight,
                           quantize_weight, scale_zero_point, weight_qmax, weight_scales)

PASS = "quantize"
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
DATA_OPS = ("MaxPool", "Add", "Concat")
SHARE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
FUSE_ACTS = ("Relu", "Clip")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["int8", "fp16"] = "int8"
    # int8
    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"  # activations
    percentile: float = 99.99        # for method=percentile
    weight_method: Literal["minmax", "mse"] = "minmax"
    weight_bits: Literal["auto", 8, 7] = "auto"  # 7: u8 x s7 pair sums never saturate
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = True
    ops: tuple[str, ...] = COMPUTE_OPS + DATA_OPS
    exclude: tuple[str, ...] = ()    # node names kept in float (int8 and fp16)
    fuse_activations: bool = True    # Relu/Clip after a quantized op: Q/DQ after them
    quantize_outputs: bool = False   # Q/DQ on graph outputs too (e.g. the logits)
    bias_correction: bool = False
    sensitivity: bool = False        # each layer quantized alone: error / agreement / accuracy
    sensitivity_rows: int = 512
    calib_samples: int = 2048        # calibration rows used (streamed)
    batch: int = 64
    progress: bool = True            # a progress bar when stderr is a terminal
    # fp16
    keep_io_types: bool = True       # graph inputs/outputs stay float32 (Cast at the edges)
    block_ops: tuple[str, ...] = ()  # op types kept in float32
    compute: Literal["fp16", "fp32"] = "fp16"  # fp32: weights stored fp16, computed fp32 (x86)

    def __post_init__(self):
        if not (50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be within (50, 100], got {self.percentile}")
        bad = [o for o in self.ops if o not in COMPUTE_OPS + DATA_OPS]
        if bad:
            raise ValueError(f"ops: cannot quantize {', '.join(bad)} (supported: "
                             f"{', '.join(COMPUTE_OPS + DATA_OPS)})")
        if self.calib_samples < 1 or self.batch < 1 or self.sensitivity_rows < 1:
            raise ValueError("calib_samples, batch and sensitivity_rows must be >= 1")


# ----------------------------------------------------------------------------- planning

@dataclass
class Target:
    node: onnx.NodeProto
    x: str           # activation input
    w: str           # weight initializer
    axis: int        # output-channel axis of the weight
    bias: str | None


def _float_types(m) -> dict[str, int]:
    from edgec.core.importer import infer_shapes

    try:
        mm = infer_shapes(m)
    except Exception:  # noqa: BLE001
        mm = m
    out = {}
    for vi in list(mm.graph.input) + list(mm.graph.value_info) + list(mm.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for t in mm.graph.initializer:
        out[t.name] = t.data_type
    return out


def _select(m, config, report: PassReport | None):
    """The nodes to quantize: ({name: Target} for Conv/Gemm/MatMul, {name} for the others)."""
    inits = initializers(m)
    types = _float_types(m)
    targets: dict[str, Target] = {}
    data: set[str] = set()

    def skip(n, why):
        if report is not None:
            report.skip(n, why)

    for n in m.graph.node:
        if n.op_type not in config.ops:
            continue
        if n.name in config.exclude:
            skip(n, "in quantize.exclude (kept in float)")
            continue
        acts = [i for i in n.input[:1]] if n.op_type in COMPUTE_OPS + ("MaxPool",) else \
            [i for i in n.input if i]
        if any(types.get(i, TensorProto.FLOAT) != TensorProto.FLOAT for i in acts):
            skip(n, "activation is not float32")
            continue
        if n.op_type in DATA_OPS:
            if any(i in inits for i in acts):
                skip(n, f"{n.op_type} with a constant operand is kept in float")
                continue
            if n.op_type == "MaxPool" and len([o for o in n.output if o]) > 1:
                skip(n, "MaxPool with an Indices output is kept in float")
                continue
            data.add(n.name)
            continue
        if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
            skip(n, "weight is not a constant (or the input is)")
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.dtype != np.float32:
            skip(n, f"weight dtype {w.dtype} (only float32 is quantized)")
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "Gemm":
            if attr(n, "transA", 0):
                skip(n, "Gemm with transA is kept in float")
                continue
            if attr(n, "alpha", 1.0) != 1.0 or attr(n, "beta", 1.0) != 1.0:
                skip(n, "Gemm with alpha/beta != 1 is kept in float")
                continue
            axis = 0 if attr(n, "transB", 0) else 1
        else:
            if w.ndim != 2:
                skip(n, f"MatMul weight of rank {w.ndim} is kept in float")
                continue
            axis = 1
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None:
            nk = w.shape[axis]
            if bias not in inits or numpy_helper.to_array(inits[bias]).size != nk:
                bias = "float"  # a non-constant or broadcast bias stays float
        targets[n.name] = Target(n, n.input[0], n.input[1], axis, bias)
    return targets, data


class _UF:
    def __init__(self):
        self.p: dict[str, str] = {}

    def find(self, a):
        self.p.setdefault(a, a)
        while self.p[a] != a:
            self.p[a] = self.p[self.p[a]]
            a = self.p[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[rb] = ra


@dataclass
class Plan:
    tensors: dict[str, str]                 # tensor -> "all" (every reader gets DQ) | "some"
    readers: dict[str, set]                 # tensor -> {(node name, input index)} for "some"
    groups: dict[str, str]                  # tensor -> group root (shared scale)
    fused: dict[str, str]                   # activation node name -> the node it is fused to


def _plan(m, qnodes: set[str], config) -> Plan:
    users = consumers(m)
    graph_out = {o.name for o in m.graph.output}
    tensors: dict[str, str] = {}
    readers: dict[str, set] = {}
    fused: dict[str, str] = {}
    uf = _UF()
    by_name = {n.name: n for n in m.graph.node}
    inits = {t.name for t in m.graph.initializer}

    def out_tensor(n):
        out = n.output[0]
        if config.fuse_activations and n.op_type in COMPUTE_OPS + ("Add",) and \
                out not in graph_out and len(users[out]) == 1 and \
                users[out][0].op_type in FUSE_ACTS and \
                all(i in inits or not i for i in users[out][0].input[1:]):
            act = users[out][0]
            fused[act.name] = n.name
            return act.output[0]
        return out

    for name in qnodes:
        n = by_name[name]
        idx = [0] if n.op_type in COMPUTE_OPS + ("MaxPool",) else \
            [i for i, x in enumerate(n.input) if x]
        for i in idx:
            t = n.input[i]
            tensors.setdefault(t, "some")
            readers.setdefault(t, set()).add((name, i))
        o = out_tensor(n)
        if o not in graph_out or config.quantize_outputs:
            tensors[o] = "all"
        if n.op_type == "MaxPool":
            uf.union(n.input[0], o)
        elif n.op_type == "Concat":
            for t in n.input:
                if t:
                    uf.union(n.output[0], t)
    # tensors produced by a quantized op (or its fused activation) are int8 for every reader
    producers = {o: n for n in m.graph.node for o in n.output}
    for t in list(tensors):
        p = producers.get(t)
        if p is not None and (p.name in qnodes or p.name in fused):
            tensors[t] = "all"
    # reshapes of a quantized tensor into a quantized input share its scale
    for n in m.graph.node:
        if n.op_type in SHARE_OPS and n.input[0] in tensors and n.output[0] in tensors:
            uf.union(n.input[0], n.output[0])
    return Plan(tensors, readers, {t: uf.find(t) for t in tensors}, fused)


# ----------------------------------------------------------------------------- calibration

def _feeds(ctx: PassContext):
    calib = {k: v for k, v in ctx.calib.items() if k != "labels"}
    labels = ctx.calib.get("labels")
    return calib, labels


def _observe(m, tensors: list[str], calib, config, hist: bool) -> dict[str, Observer]:
    from ._calib import calib_rows, fixed_batch, stream_activations

    total = min(calib_rows(calib), config.calib_samples)
    batch = fixed_batch(m) or config.batch
    obs = {t: Observer() for t in tensors}
    stages = ["range"] + (["hist"] if hist else [])
    bar = None
    if config.progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(stages) * math.ceil(total / batch), desc="quantize: calibrating",
                   unit="batch", leave=False)
    for stage in stages:
        for acts in stream_activations(m, calib, tensors, batch=batch, limit=total):
            for t, x in acts.items():
                x = np.asarray(x, np.float32)
                if stage == "range":
                    obs[t].update_range(x)
                else:
                    obs[t].update_hist(x)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return obs


def _params(plan: Plan, obs: dict[str, Observer], config) -> tuple[dict, dict]:
    """(s, z) per tensor (groups share the union of their members' clip ranges)."""
    clip = {t: activation_range(obs[t], config.method, config.percentile,
                                config.activation_type) for t in plan.tensors}
    group_rng: dict[str, list] = {}
    for t, (a, b) in clip.items():
        g = plan.groups[t]
        lo, hi = group_rng.get(g, (np.inf, -np.inf))
        group_rng[g] = (min(lo, a), max(hi, b))
    params, table = {}, {}
    for t in plan.tensors:
        lo, hi = group_rng[plan.groups[t]]
        s, z = scale_zero_point(lo, hi, config.activation_type)
        params[t] = (s, z)
        table[t] = {"observed": [obs[t].lo, obs[t].hi], "clip": [float(clip[t][0]),
                    float(clip[t][1])], "scale": s, "zero_point": z,
                    "shared_with": plan.groups[t] if plan.groups[t] != t else None}
    return params, table


# ----------------------------------------------------------------------------- rewrite

def _rewrite(m0, targets: dict[str, Target], qnodes: set[str], params: dict, config,
             means: dict[str, np.ndarray] | None = None):
    """The QDQ model: Q/DQ pairs on the planned tensors, int8 weights and int32 biases behind
    DequantizeLinear. Returns (model, per-layer table)."""
    m = copy_model(m0)
    plan = _plan(m, qnodes, config)
    names = all_names(m)
    inits = initializers(m)
    qdt = np.uint8 if config.activation_type == "uint8" else np.int8
    by_name = {n.name: n for n in m.graph.node}
    after: dict[str, list] = {}      # tensor -> Q/DQ nodes placed after its producer
    before: dict[str, list] = {}     # node name -> DQ nodes placed before it
    new_inits = []
    dq_name: dict[str, str] = {}
    rename: dict[str, str] = {}
    for t, mode in plan.tensors.items():
        if t not in params:
            continue
        s, z = params[t]
        sn = unique_name(names, f"{t}_scale")
        zn = unique_name(names, f"{t}_zero_point")
        qn = unique_name(names, f"{t}_quantized")
        new_inits += [numpy_helper.from_array(np.array(s, np.float32), sn),
                      numpy_helper.from_array(np.array(z, qdt), zn)]
        src = t
        if mode == "all":  # the producer writes t_float, DequantizeLinear writes t
            src = unique_name(names, f"{t}_float")
            rename[t] = src
            dn = t
        else:
            dn = unique_name(names, f"{t}_dequantized")
        q = helper.make_node("QuantizeLinear", [src, sn, zn], [qn],
                             name=unique_name(names, f"{t}/QuantizeLinear"))
        d = helper.make_node("DequantizeLinear", [qn, sn, zn], [dn],
                             name=unique_name(names, f"{t}/DequantizeLinear"))
        for n in (q, d):
            set_provenance(n, PASS, t, scale=s, zero_point=z, what="activation")
        after[t] = [q, d]
        dq_name[t] = dn
    for n in m.graph.node:
        for i, o in enumerate(n.output):
            if o in rename:
                n.output[i] = rename[o]
    for t, mode in plan.tensors.items():
        if mode == "some" and t in dq_name:
            for node_name, i in plan.readers[t]:
                by_name[node_name].input[i] = dq_name[t]
    table = []
    for name in [n.name for n in m0.graph.node if n.name in qnodes]:
        node = by_name[name]
        if name not in targets:
            set_provenance(node, PASS, name, quantized="int8")
            table.append({"node": name, "op": node.op_type})
            continue
        tg = targets[name]
        w = numpy_helper.to_array(inits[tg.w]).astype(np.float64)
        qmax = weight_qmax(config.weight_bits)
        sw = weight_scales(w, tg.axis, config.weight_method, config.per_channel, qmax=qmax)
        sx = params[tg.x][0]
        b = None
        if tg.bias not in (None, "float"):
            b = numpy_helper.to_array(inits[tg.bias]).astype(np.float64).reshape(-1)
            # a bias must fit int32 at scale s_x * s_w[k]: raise s_w[k] where it would not
            need = np.abs(b) / (sx * (INT32_MAX - 1))
            sw_full = np.broadcast_to(sw, b.shape).copy()
            grown = need > sw_full
            if grown.any():
                sw = np.maximum(sw_full, need) if len(sw) > 1 else \
                    np.array([max(sw[0], need.max())])
        wq = quantize_weight(w, sw, tg.axis, qmax)
        wdeq = dequantize_weight(wq, sw, tg.axis)
        wqn = unique_name(names, f"{tg.w}_int8")
        wsn = unique_name(names, f"{tg.w}_scale")
        wzn = unique_name(names, f"{tg.w}_zero_point")
        wdn = unique_name(names, f"{tg.w}_dequantized")
        per = len(sw) > 1
        new_inits += [numpy_helper.from_array(wq, wqn),
                      numpy_helper.from_array(sw.astype(np.float32) if per
                                              else np.array(sw[0], np.float32), wsn),
                      numpy_helper.from_array(np.zeros(len(sw), np.int8) if per
                                              else np.array(0, np.int8), wzn)]
        wd = helper.make_node("DequantizeLinear", [wqn, wsn, wzn], [wdn],
                              name=unique_name(names, f"{name}/weight/DequantizeLinear"),
                              **({"axis": tg.axis} if per else {}))
        set_provenance(wd, PASS, name, what="weight", method=config.weight_method)
        extra = [wd]
        row = {"node": name, "op": node.op_type, "input": tg.x, "input_scale": sx,
               "input_zero_point": params[tg.x][1], "weight_axis": tg.axis,
               "weight_method": config.weight_method,
               "weight_scale_min": float(sw.min()), "weight_scale_max": float(sw.max()),
               "weight_clipped_channels": int(np.sum(
                   np.abs(np.moveaxis(w, tg.axis, 0).reshape(w.shape[tg.axis], -1)).max(1)
                   > qmax * np.broadcast_to(sw, (w.shape[tg.axis],)) * (1 + 1e-6))),
               "weight_rel_error": float(np.linalg.norm(wdeq - w)
                                         / max(np.linalg.norm(w), 1e-30))}
        if b is not None:
            if config.bias_correction and means is not None and means.get(tg.x) is not None:
                mu = means[tg.x]
                dw = wdeq - w
                g = attr(node, "group", 1)
                if node.op_type == "Conv" and dw.ndim >= 3 and len(mu) == dw.shape[1] * g:
                    K, Cg = dw.shape[:2]
                    red = dw.reshape(K, Cg, -1).sum(axis=2)       # [K, C/g]
                    mu_g = mu.reshape(g, Cg)[np.arange(K) // (K // g)]  # [K, C/g]
                    delta = (red * mu_g).sum(axis=1)
                elif node.op_type != "Conv" and mu is not None:
                    Wm = dw if tg.axis == 1 else dw.T          # [in, out]
                    delta = mu @ Wm if len(mu) == Wm.shape[0] else None
                else:
                    delta = None
                if delta is not None and delta.shape == b.shape:
                    b = b - delta
                    row["bias_correction_max"] = float(np.abs(delta).max())
            sb = (sx * np.broadcast_to(sw, b.shape)).astype(np.float32)
            bq = np.round(b / sb.astype(np.float64))
            over = int(np.sum(np.abs(bq) > INT32_MAX))
            bq = np.clip(bq, -INT32_MAX, INT32_MAX).astype(np.int32)
            bqn = unique_name(names, f"{tg.bias}_int32")
            bsn = unique_name(names, f"{tg.bias}_scale")
            bzn = unique_name(names, f"{tg.bias}_zero_point")
            bdn = unique_name(names, f"{tg.bias}_dequantized")
            new_inits += [numpy_helper.from_array(bq, bqn), numpy_helper.from_array(sb, bsn),
                          numpy_helper.from_array(np.zeros(len(sb), np.int32), bzn)]
            bd = helper.make_node("DequantizeLinear", [bqn, bsn, bzn], [bdn],
                                  name=unique_name(names, f"{name}/bias/DequantizeLinear"),
                                  axis=0)
            set_provenance(bd, PASS, name, what="bias")
            extra.append(bd)
            node.input[2] = bdn
            row["bias_overflow"] = over
        node.input[1] = wdn
        set_provenance(node, PASS, name, quantized="int8")
        before.setdefault(name, []).extend(extra)
        table.append(row)
    # order: graph-input Q/DQ first, weight DQs right before their node, activation Q/DQ
    # right after the producer
    order = []
    produced = {o for n in m0.graph.node for o in n.output}
    for t in after:
        if t not in produced:
            order += after[t]
    unrename = {v: k for k, v in rename.items()}
    for n in m.graph.node:
        order += before.get(n.name, [])
        order.append(n)
        for o in n.output:
            t = unrename.get(o, o)
            if t in after and t in produced:
                order += after[t]
    del m.graph.node[:]
    m.graph.node.extend(order)
    m.graph.initializer.extend(new_inits)
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m, table, plan


# ----------------------------------------------------------------------------- the pass

@register_pass(PASS, QuantizeConfig, tolerance=Tolerance(rtol=5e-2, atol=5e-2, min_cosine=0.98))
def quantize(model: onnx.ModelProto, config: QuantizeConfig, ctx: PassContext):
    if config.mode == "fp16":
        from ._quant_fp16 import to_fp16

        return to_fp16(model, config)
    if ctx.calib is None:
        raise EdgecError("quantize.mode=int8 needs calibration data: give --calib FILE.npz")
    report = PassReport(PASS)
    config, bits_why = _weight_bits(config, ctx)
    m = copy_model(model)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node):
        for n in m.graph.node:
            if n.op_type in config.ops:
                report.skip(n, "the model is already quantized (QDQ nodes present)")
        return m, report
    targets, data = _select(m, config, report)
    if not targets:
        for n in m.graph.node:
            if n.name in data:
                report.skip(n, "no Conv/Gemm/MatMul is quantized, so it stays float")
        return m, report
    qnodes = set(targets) | data
    plan = _plan(m, qnodes, config)
    calib, labels = _feeds(ctx)
    obs = _observe(m, list(plan.tensors), calib, config, hist=config.method != "minmax")
    params, acts = _params(plan, obs, config)
    means = {t: o.channel_mean() for t, o in obs.items()} if config.bias_correction else None
    out, table, plan = _rewrite(m, targets, qnodes, params, config, means)
    for row in table:
        if row["node"] in targets:
            report.rewrite(row["node"], f"int8 {row['op']}: {config.weight_bits}-bit weights "
                           f"per channel "
                           f"(axis {row['weight_axis']}), input s={row['input_scale']:.4g} "
                           f"z={row['input_zero_point']}",
                           weight_rel_error=round(row["weight_rel_error"], 6))
        else:
            report.rewrite(row["node"], f"{row['op']} kept in int8 (Q/DQ on its tensors)")
    report.details = {"mode": "int8", "method": config.method,
                      "weight_method": config.weight_method,
                      "weight_bits": config.weight_bits, "weight_bits_reason": bits_why,
                      "activation_type": config.activation_type,
                      "per_channel": config.per_channel,
                      "calib_rows": int(min(next(iter(calib.values())).shape[0],
                                            config.calib_samples)),
                      "layers": table, "activations": acts,
                      "fused": [{"activation": a, "into": b} for a, b in plan.fused.items()]}
    if config.sensitivity:
        report.details["sensitivity"] = _sensitivity(m, targets, data, params, config, calib,
                                                     labels, means)
    return out, report


def _weight_bits(config: QuantizeConfig, ctx: PassContext) -> tuple[QuantizeConfig, str]:
    """``weight_bits=auto`` resolved for the compile target, and why."""
    if config.weight_bits != "auto":
        return config, "set by the user"
    t = ctx.target
    if t is not None and t.int8_pairs_saturate:
        bits, why = 7, (f"target {t.name} ({t.int8_isa}): x86 without VNNI sums u8 x s8 "
                        "products in saturating 16-bit pairs; 7-bit weights keep them exact")
    elif t is not None:
        bits, why = 8, f"target {t.name} ({t.int8_isa or t.device}): 8-bit products are exact"
    else:
        bits, why = 8, "no compile target given"
    return dataclasses.replace(config, weight_bits=bits), why


def _run(model, feeds, batch) -> np.ndarray:
    from ._calib import collect

    name = model.graph.output[0].name
    return collect(model, feeds, [name], batch=batch)[name]


def _sensitivity(m, targets, data, params, config, calib, labels, means) -> list[dict]:
    """Each Conv/Gemm/MatMul quantized alone (weights, input, output): relative output error,
    top-1 agreement and, with labels, the accuracy drop vs the float model."""
    n = min(next(iter(calib.values())).shape[0], config.sensitivity_rows)
    feeds = {k: v[:n] for k, v in calib.items()}
    ref = _run(m, feeds, config.batch)
    lab = None if labels is None else np.asarray(labels)[:n].reshape(-1)
    acc0 = float(np.mean(ref.argmax(-1) == lab)) if lab is not None and ref.ndim == 2 else None
    rows = []
    for name in [x.name for x in m.graph.node if x.name in targets]:
        one, _, _ = _rewrite(m, targets, {name}, params, config, means)
        got = _run(one, feeds, config.batch)
        row = {"node": name, "op": targets[name].node.op_type, "output_error": float(
            np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))}
        if ref.ndim == 2 and ref.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
            if acc0 is not None:
                acc = float(np.mean(got.argmax(1) == lab))
                row["accuracy"] = acc
                row["accuracy_drop_points"] = round(100 * (acc0 - acc), 3)
        rows.append(row)
    rows.sort(key=lambda x: -x["output_error"])
    return rows
