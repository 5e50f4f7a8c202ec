"""The fp16 half of the quantize pass (``quantize.mode=fp16``).

``compute=fp16``: every float32 initializer becomes float16, every op not blocked computes in
float16, and a Cast sits wherever a float32 tensor meets a float16 reader or the other way
round: after the graph inputs and before the graph outputs (``keep_io_types``), around the
ops of ``block_ops`` / ``exclude``, and before inputs that must stay float32 (Resize roi and
scales). Cast nodes to float inside the graph become casts to float16.

``compute=fp32`` (x86, where fp16 arithmetic is emulated): ``W -> Cast(W16, to=float)`` for
each float32 initializer of 16 or more elements; the graph computes in float32 as before, only
the file (weights) halves.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.core.graph import all_names, set_provenance, unique_name

from . import PassReport, copy_model

FP16_MAX = 65504.0
FP32_SLOTS = {"Resize": {1, 2}, "Upsample": {1}}
ALWAYS_FP32 = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "EyeLike", "Multinomial", "If", "Loop", "Scan", "Bernoulli"}
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _half(a: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(a, np.float32)
    over = int(np.sum(np.abs(a) > FP16_MAX))
    return np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), over


def to_fp16(model: onnx.ModelProto, config):
    from .quantize import PASS

    report = PassReport(PASS)
    m = copy_model(model)
    names = all_names(m)
    if config.compute == "fp32":
        return _storage_only(m, config, report, names)
    from .quantize import _float_types

    types = _float_types(m)
    is_float = lambda t: bool(t) and types.get(t) == F32  # noqa: E731
    blocked = {n.name for n in m.graph.node
               if n.op_type in config.block_ops or n.name in config.exclude
               or n.op_type in ALWAYS_FP32}
    inits = {t.name: t for t in m.graph.initializer}
    graph_in = [vi for vi in m.graph.input if vi.name not in inits]

    def want(node, i) -> int:
        return F32 if node.name in blocked or i in FP32_SLOTS.get(node.op_type, ()) else F16

    # current dtype of each float tensor in the new graph
    cur: dict[str, int] = {}
    for vi in graph_in:
        if is_float(vi.name):
            cur[vi.name] = F32 if config.keep_io_types else F16
    init_half = {t for t in inits if is_float(t) and any(
        want(n, i) == F16 for n in m.graph.node for i, x in enumerate(n.input) if x == t)}
    overflow = 0
    for t in m.graph.initializer:
        if t.name in init_half:
            a, over = _half(numpy_helper.to_array(t))
            overflow += over
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            cur[t.name] = F16
        elif is_float(t.name):
            cur[t.name] = F32
    for n in m.graph.node:
        fp16 = n.name not in blocked
        for o in n.output:
            if is_float(o):
                cur[o] = F16 if fp16 else F32
        if not fp16:
            report.skip(n, f"{'in quantize.block_ops' if n.op_type in config.block_ops else 'in quantize.exclude' if n.name in config.exclude else 'op has no fp16 form here'} (kept in float32)")
            continue
        changed = False
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == F32:
                    a.i = F16
                    changed = True
        elif n.op_type in ("Constant", "ConstantOfShape"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    h, over = _half(numpy_helper.to_array(a.t))
                    overflow += over
                    a.t.CopyFrom(numpy_helper.from_array(h, a.t.name))
                    changed = True
        if changed or any(is_float(x) for x in list(n.input) + list(n.output)):
            report.rewrite(n, "computes in float16")
    # graph outputs: fp16 producers write <o>_fp16 and a Cast writes o (keep_io_types)
    tail = []
    for o in m.graph.output:
        if cur.get(o.name) != F16:
            continue
        if config.keep_io_types:
            new = unique_name(names, f"{o.name}_fp16")
            for n in m.graph.node:
                for i, x in enumerate(n.output):
                    if x == o.name:
                        n.output[i] = new
                for i, x in enumerate(n.input):
                    if x == o.name:
                        n.input[i] = new
            cur[new] = F16
            c = helper.make_node("Cast", [new], [o.name], to=F32,
                                 name=unique_name(names, f"{o.name}/Cast_fp32"))
            set_provenance(c, PASS, o.name, what="output cast")
            tail.append(c)
        else:
            o.type.tensor_type.elem_type = F16
    if not config.keep_io_types:
        for vi in m.graph.input:
            if vi.name not in inits and is_float(vi.name):
                vi.type.tensor_type.elem_type = F16
    # casts where a reader wants another dtype than the tensor has
    casts: dict[tuple[str, int], str] = {}
    order = []
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x not in cur:
                continue
            w = want(n, i)
            if w == cur[x]:
                continue
            key = (x, w)
            if key not in casts:
                out = unique_name(names, f"{x}_{'fp16' if w == F16 else 'fp32'}")
                c = helper.make_node("Cast", [x], [out], to=w,
                                     name=unique_name(names, f"{x}/Cast_{'fp16' if w == F16 else 'fp32'}"))
                set_provenance(c, PASS, x, what="cast")
                casts[key] = out
                order.append(c)
            n.input[i] = casts[key]
        order.append(n)
    order += tail
    del m.graph.node[:]
    m.graph.node.extend(order)
    del m.graph.value_info[:]
    report.details = {"mode": "fp16", "compute": "fp16", "keep_io_types": config.keep_io_types,
                      "block_ops": list(config.block_ops), "casts": len(casts) + len(tail),
                      "fp16_initializers": len(init_half), "overflow_clipped": overflow}
    return m, report


def _storage_only(m, config, report, names):
    """Weights stored fp16 with a Cast back to float32 in front of the graph."""
    head, new, overflow = [], [], 0
    graph_in = {vi.name for vi in m.graph.input}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.data_type != F32 or a.size < 16:
            new.append(t)
            continue
        h, over = _half(a)
        overflow += over
        hn = unique_name(names, f"{t.name}_fp16")
        new.append(numpy_helper.from_array(h, hn))
        c = helper.make_node("Cast", [hn], [t.name], to=F32,
                             name=unique_name(names, f"{t.name}/Cast_fp32"))
        set_provenance(c, "quantize", t.name, what="fp16 weight storage")
        head.append(c)
        report.rewrite(c.name, f"weight {t.name} stored as float16, cast to float32")
    if head:
        keep_in = [vi for vi in m.graph.input if vi.name not in {c.output[0] for c in head}]
        if len(keep_in) != len(m.graph.input):
            del m.graph.input[:]
            m.graph.input.extend(keep_in)
        del m.graph.initializer[:]
        m.graph.initializer.extend(new)
        nodes = head + list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    del graph_in
    report.details = {"mode": "fp16", "compute": "fp32", "fp16_initializers": len(head),
                      "overflow_clipped": overflow}
    return m, report
