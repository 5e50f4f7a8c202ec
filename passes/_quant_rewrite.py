"""The quantize pass's rewrite: Q/DQ pairs on the planned activation tensors, int8 weights and
int32 biases behind DequantizeLinear, the nodes placed in graph order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

from edgec.core.graph import all_names, attr, initializers, set_provenance, unique_name

from . import copy_model
from ._quant_calib import (INT32_MAX, dequantize_weight, quantize_weight, weight_qmax,
                           weight_scales)
from ._quant_plan import Plan, Target, plan as make_plan
from ._toolkit import drop_unused_initializers, relative_error, rename_outputs, set_nodes

PASS = "quantize"


def _names(names: set, base: str, *suffixes: str) -> list[str]:
    return [unique_name(names, f"{base}_{s}") for s in suffixes]


def rewrite(m0, targets: dict[str, Target], qnodes: set[str], params: dict, config,
            means: dict[str, np.ndarray] | None = None):
    """The QDQ model: Q/DQ pairs on the planned tensors, int8 weights and int32 biases behind
    DequantizeLinear. Returns (model, per-layer table, plan)."""
    m = copy_model(m0)
    plan = make_plan(m, qnodes, config)
    names = all_names(m)
    new_inits: list = []
    after, dq_name, rename = _activation_qdq(plan, params, config, names, new_inits)
    rename_outputs(m, rename)
    by_name = {n.name: n for n in m.graph.node}
    for t, mode in plan.tensors.items():
        if mode == "some" and t in dq_name:
            for node_name, i in plan.readers[t]:
                by_name[node_name].input[i] = dq_name[t]
    inits = initializers(m)
    before: dict[str, list] = {}     # node name -> DQ nodes placed before it
    table = []
    for name in [n.name for n in m0.graph.node if n.name in qnodes]:
        node = by_name[name]
        if name not in targets:
            set_provenance(node, PASS, name, quantized="int8")
            table.append({"node": name, "op": node.op_type})
            continue
        extra, row = _quantize_layer(node, targets[name], inits, params, config, means, names,
                                     new_inits)
        before.setdefault(name, []).extend(extra)
        table.append(row)
    _place(m, m0, after, before, rename)
    m.graph.initializer.extend(new_inits)
    drop_unused_initializers(m)
    return m, table, plan


def _activation_qdq(plan: Plan, params: dict, config, names: set, new_inits: list):
    """Q/DQ node pairs per planned tensor: ({tensor: [Q, DQ]}, {tensor: DQ output},
    {tensor: the name its producer writes instead})."""
    qdt = np.uint8 if config.activation_type == "uint8" else np.int8
    after: dict[str, list] = {}      # tensor -> Q/DQ nodes placed after its producer
    dq_name: dict[str, str] = {}
    rename: dict[str, str] = {}
    for t, mode in plan.tensors.items():
        if t not in params:
            continue
        s, z = params[t]
        sn, zn, qn = _names(names, t, "scale", "zero_point", "quantized")
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
    return after, dq_name, rename


@dataclass
class _Weights:
    w: np.ndarray         # float64 weights
    sw: np.ndarray        # per-channel (or one) scale
    qmax: int
    b: np.ndarray | None  # float64 bias (None: none, or kept float)


def _scales(tg: Target, inits, sx: float, config) -> _Weights:
    """Weight scales; a bias that would not fit int32 at ``s_x * s_w[k]`` raises ``s_w[k]``."""
    w = numpy_helper.to_array(inits[tg.w]).astype(np.float64)
    qmax = weight_qmax(config.weight_bits)
    sw = weight_scales(w, tg.axis, config.weight_method, config.per_channel, qmax=qmax)
    b = None
    if tg.bias not in (None, "float"):
        b = numpy_helper.to_array(inits[tg.bias]).astype(np.float64).reshape(-1)
        need = np.abs(b) / (sx * (INT32_MAX - 1))
        sw_full = np.broadcast_to(sw, b.shape).copy()
        grown = need > sw_full
        if grown.any():
            sw = np.maximum(sw_full, need) if len(sw) > 1 else \
                np.array([max(sw[0], need.max())])
    return _Weights(w, sw, qmax, b)


def _quantize_layer(node, tg: Target, inits, params: dict, config, means, names: set,
                    new_inits: list):
    """One Conv/Gemm/MatMul: its weight (and bias) behind DequantizeLinear. Returns (the DQ
    nodes to place before it, its table row)."""
    name = node.name
    sx = params[tg.x][0]
    W = _scales(tg, inits, sx, config)
    w, sw, qmax = W.w, W.sw, W.qmax
    wq = quantize_weight(w, sw, tg.axis, qmax)
    wdeq = dequantize_weight(wq, sw, tg.axis)
    wqn, wsn, wzn, wdn = _names(names, tg.w, "int8", "scale", "zero_point", "dequantized")
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
           "weight_rel_error": relative_error(wdeq, w)}
    if W.b is not None:
        b = W.b
        if config.bias_correction and means is not None and means.get(tg.x) is not None:
            delta = _bias_shift(node, tg, wdeq - w, means[tg.x])
            if delta is not None and delta.shape == b.shape:
                b = b - delta
                row["bias_correction_max"] = float(np.abs(delta).max())
        extra.append(_bias_dq(node, tg, b, sx * np.broadcast_to(sw, b.shape), names,
                              new_inits, row))
    node.input[1] = wdn
    set_provenance(node, PASS, name, quantized="int8")
    return extra, row


def _bias_shift(node, tg: Target, dw: np.ndarray, mu: np.ndarray) -> np.ndarray | None:
    """``sum (W~ - W)[k] E[x]``: the expected output shift the weight rounding causes."""
    g = attr(node, "group", 1)
    if node.op_type == "Conv" and dw.ndim >= 3 and len(mu) == dw.shape[1] * g:
        K, Cg = dw.shape[:2]
        red = dw.reshape(K, Cg, -1).sum(axis=2)       # [K, C/g]
        mu_g = mu.reshape(g, Cg)[np.arange(K) // (K // g)]  # [K, C/g]
        return (red * mu_g).sum(axis=1)
    if node.op_type != "Conv" and mu is not None:
        Wm = dw if tg.axis == 1 else dw.T          # [in, out]
        return mu @ Wm if len(mu) == Wm.shape[0] else None
    return None


def _bias_dq(node, tg: Target, b: np.ndarray, scale: np.ndarray, names: set, new_inits: list,
             row: dict):
    """The int32 bias at ``scale`` behind DequantizeLinear; the node reads it."""
    name = node.name
    sb = scale.astype(np.float32)
    bq = np.round(b / sb.astype(np.float64))
    over = int(np.sum(np.abs(bq) > INT32_MAX))
    bq = np.clip(bq, -INT32_MAX, INT32_MAX).astype(np.int32)
    bqn, bsn, bzn, bdn = _names(names, tg.bias, "int32", "scale", "zero_point", "dequantized")
    new_inits += [numpy_helper.from_array(bq, bqn), numpy_helper.from_array(sb, bsn),
                  numpy_helper.from_array(np.zeros(len(sb), np.int32), bzn)]
    bd = helper.make_node("DequantizeLinear", [bqn, bsn, bzn], [bdn],
                          name=unique_name(names, f"{name}/bias/DequantizeLinear"), axis=0)
    set_provenance(bd, PASS, name, what="bias")
    node.input[2] = bdn
    row["bias_overflow"] = over
    return bd


def _place(m, m0, after: dict, before: dict, rename: dict) -> None:
    """Node order: graph-input Q/DQ first, weight DQs right before their node, activation
    Q/DQ right after the producer."""
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
    set_nodes(m, order)
