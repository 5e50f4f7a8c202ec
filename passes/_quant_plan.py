"""The quantize pass's selection and plan: which nodes are quantized, which tensors get a
Q/DQ pair, which share one scale, and the scales observed on calibration data."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgec.core.graph import attr, consumers, initializers

from . import PassReport
from ._quant_calib import Observer, activation_range, scale_zero_point
from ._toolkit import UnionFind, chunking, elem_types, producers, stream_activations

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
DATA_OPS = ("MaxPool", "Add", "Concat")
SHARE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
FUSE_ACTS = ("Relu", "Clip")


@dataclass
class Target:
    node: onnx.NodeProto
    x: str           # activation input
    w: str           # weight initializer
    axis: int        # output-channel axis of the weight
    bias: str | None


def _activations(n: onnx.NodeProto) -> list[str]:
    """The inputs of a quantized node that carry activations."""
    return [i for i in n.input[:1]] if n.op_type in COMPUTE_OPS + ("MaxPool",) else \
        [i for i in n.input if i]


def _data_skip(n, acts: list[str], inits) -> str | None:
    """Why a MaxPool/Add/Concat stays float (None: it is quantized)."""
    if any(i in inits for i in acts):
        return f"{n.op_type} with a constant operand is kept in float"
    if n.op_type == "MaxPool" and len([o for o in n.output if o]) > 1:
        return "MaxPool with an Indices output is kept in float"
    return None


def _target(n, inits) -> Target | str:
    """The Conv/Gemm/MatMul's weight view, or why it stays float."""
    if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
        return "weight is not a constant (or the input is)"
    w = numpy_helper.to_array(inits[n.input[1]])
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} (only float32 is quantized)"
    if n.op_type == "Conv":
        axis = 0
    elif n.op_type == "Gemm":
        if attr(n, "transA", 0):
            return "Gemm with transA is kept in float"
        if attr(n, "alpha", 1.0) != 1.0 or attr(n, "beta", 1.0) != 1.0:
            return "Gemm with alpha/beta != 1 is kept in float"
        axis = 0 if attr(n, "transB", 0) else 1
    else:
        if w.ndim != 2:
            return f"MatMul weight of rank {w.ndim} is kept in float"
        axis = 1
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if bias is not None:
        nk = w.shape[axis]
        if bias not in inits or numpy_helper.to_array(inits[bias]).size != nk:
            bias = "float"  # a non-constant or broadcast bias stays float
    return Target(n, n.input[0], n.input[1], axis, bias)


def select(m, config, report: PassReport | None):
    """The nodes to quantize: ({name: Target} for Conv/Gemm/MatMul, {name} for the others)."""
    inits = initializers(m)
    types = elem_types(m)
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
        acts = _activations(n)
        if any(types.get(i, TensorProto.FLOAT) != TensorProto.FLOAT for i in acts):
            skip(n, "activation is not float32")
            continue
        got = _data_skip(n, acts, inits) if n.op_type in DATA_OPS else _target(n, inits)
        if isinstance(got, str):
            skip(n, got)
        elif got is None:
            data.add(n.name)
        else:
            targets[n.name] = got
    return targets, data


@dataclass
class Plan:
    tensors: dict[str, str]                 # tensor -> "all" (every reader gets DQ) | "some"
    readers: dict[str, set]                 # tensor -> {(node name, input index)} for "some"
    groups: dict[str, str]                  # tensor -> group root (shared scale)
    fused: dict[str, str]                   # activation node name -> the node it is fused to


def plan(m, qnodes: set[str], config) -> Plan:
    """The Q/DQ tensors of quantizing ``qnodes`` and the groups of tensors sharing a scale."""
    users = consumers(m)
    graph_out = {o.name for o in m.graph.output}
    tensors: dict[str, str] = {}
    readers: dict[str, set] = {}
    fused: dict[str, str] = {}
    uf = UnionFind()
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

    for name in [n.name for n in m.graph.node if n.name in qnodes]:  # graph order:
        n = by_name[name]  # the same output, byte for byte, in every process
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
    producer = producers(m)
    for t in list(tensors):
        p = producer.get(t)
        if p is not None and (p.name in qnodes or p.name in fused):
            tensors[t] = "all"
    # reshapes of a quantized tensor into a quantized input share its scale
    for n in m.graph.node:
        if n.op_type in SHARE_OPS and n.input[0] in tensors and n.output[0] in tensors:
            uf.union(n.input[0], n.output[0])
    return Plan(tensors, readers, {t: uf.find(t) for t in tensors}, fused)


# ----------------------------------------------------------------------------- calibration

def observe(m, tensors: list[str], calib, config, hist: bool) -> dict[str, Observer]:
    """Each tensor's range (and, with ``hist``, histogram) over the calibration rows."""
    total, batch = chunking(m, calib, config.calib_samples, config.batch)
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


def params(plan: Plan, obs: dict[str, Observer], config) -> tuple[dict, dict]:
    """(s, z) per tensor (groups share the union of their members' clip ranges)."""
    clip = {t: activation_range(obs[t], config.method, config.percentile,
                                config.activation_type) for t in plan.tensors}
    group_rng: dict[str, list] = {}
    for t, (a, b) in clip.items():
        g = plan.groups[t]
        lo, hi = group_rng.get(g, (np.inf, -np.inf))
        group_rng[g] = (min(lo, a), max(hi, b))
    out, table = {}, {}
    for t in plan.tensors:
        lo, hi = group_rng[plan.groups[t]]
        s, z = scale_zero_point(lo, hi, config.activation_type)
        out[t] = (s, z)
        table[t] = {"observed": [obs[t].lo, obs[t].hi], "clip": [float(clip[t][0]),
                    float(clip[t][1])], "scale": s, "zero_point": z,
                    "shared_with": plan.groups[t] if plan.groups[t] != t else None}
    return out, table
