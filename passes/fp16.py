"""fp16: store weights and compute in float16, with Casts where float32 must stay.

Algebra: ``x -> fp16(x)`` for weights and activations (values beyond +-65504 are clipped and
counted), Cast nodes where a float32 tensor meets a float16 one.

``compute=fp16``: every float32 initializer read by a float16 op becomes float16, every op not
blocked computes in float16, and a Cast sits wherever a float32 tensor meets a float16 reader or
the other way round: after the graph inputs and before the graph outputs (``keep_io_types``),
around the ops of ``block_ops`` / ``exclude`` (and ops with no float16 form), and before inputs
that must stay float32 (Resize roi and scales). Cast nodes to float inside the graph become
casts to float16.

``compute=fp32`` (x86, where fp16 arithmetic is emulated): ``W -> Cast(W16, to=float)`` for
each float32 initializer of 16 or more elements; the graph computes in float32 as before, only
the file (weights) halves.

``--set quantize.mode=fp16`` runs this rewrite too (with quantize's ``keep_io_types``,
``block_ops``, ``compute`` and ``exclude``), reported and marked as the quantize pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.core.graph import all_names, set_provenance, unique_name

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._toolkit import elem_types, rename_outputs, set_nodes

PASS = "fp16"
FP16_MAX = 65504.0
FP32_SLOTS = {"Resize": {1, 2}, "Upsample": {1}}
ALWAYS_FP32 = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "EyeLike", "Multinomial", "If", "Loop", "Scan", "Bernoulli"}
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
TOLERANCE = Tolerance(rtol=5e-2, atol=5e-2, min_cosine=0.98)


@dataclass(frozen=True)
class FP16Config:
    keep_io_types: bool = True       # graph inputs/outputs stay float32 (Cast at the edges)
    block_ops: tuple[str, ...] = ()  # op types kept in float32
    compute: Literal["fp16", "fp32"] = "fp16"  # fp32: weights stored fp16, computed fp32 (x86)
    exclude: tuple[str, ...] = ()    # node names kept in float32


@register_pass(PASS, FP16Config, tolerance=TOLERANCE)
def fp16(model: onnx.ModelProto, config: FP16Config, ctx: PassContext):
    return to_fp16(model, config, PASS)


def _half(a: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(a, np.float32)
    over = int(np.sum(np.abs(a) > FP16_MAX))
    return np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), over


def to_fp16(model: onnx.ModelProto, config, pass_name: str = PASS):
    """The float16 model and its report; ``pass_name`` names the pass in the report, the
    provenance and the option names of skip reasons (``quantize`` for ``quantize.mode=fp16``)."""
    report = PassReport(pass_name)
    m = copy_model(model)
    names = all_names(m)
    if config.compute == "fp32":
        return _storage_only(m, report, names, pass_name)
    types = elem_types(m)
    is_float = lambda t: bool(t) and types.get(t) == F32  # noqa: E731
    blocked = {n.name for n in m.graph.node
               if n.op_type in config.block_ops or n.name in config.exclude
               or n.op_type in ALWAYS_FP32}
    inits = {t.name: t for t in m.graph.initializer}

    def want(node, i) -> int:
        return F32 if node.name in blocked or i in FP32_SLOTS.get(node.op_type, ()) else F16

    # current dtype of each float tensor in the new graph
    cur: dict[str, int] = {}
    for vi in m.graph.input:
        if vi.name not in inits and is_float(vi.name):
            cur[vi.name] = F32 if config.keep_io_types else F16
    init_half = {t for t in inits if is_float(t) and any(
        want(n, i) == F16 for n in m.graph.node for i, x in enumerate(n.input) if x == t)}
    overflow = _half_initializers(m, init_half, is_float, cur)
    overflow += _mark_nodes(m, blocked, config, is_float, cur, report, pass_name)
    tail = _output_casts(m, config, cur, names, pass_name)
    if not config.keep_io_types:
        for vi in m.graph.input:
            if vi.name not in inits and is_float(vi.name):
                vi.type.tensor_type.elem_type = F16
    order, casts = _input_casts(m, want, cur, names, pass_name)
    set_nodes(m, order + tail)
    del m.graph.value_info[:]
    report.details = {"mode": "fp16", "compute": "fp16", "keep_io_types": config.keep_io_types,
                      "block_ops": list(config.block_ops), "casts": casts + len(tail),
                      "fp16_initializers": len(init_half), "overflow_clipped": overflow}
    return m, report


def _half_initializers(m, init_half: set, is_float: Callable, cur: dict) -> int:
    """Initializers in ``init_half`` become float16; returns how many values were clipped."""
    overflow = 0
    for t in m.graph.initializer:
        if t.name in init_half:
            a, over = _half(numpy_helper.to_array(t))
            overflow += over
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            cur[t.name] = F16
        elif is_float(t.name):
            cur[t.name] = F32
    return overflow


def _mark_nodes(m, blocked: set, config, is_float: Callable, cur: dict, report: PassReport,
                pass_name: str) -> int:
    """Each node's float outputs get its compute type; Casts to float and float constants
    of fp16 nodes become float16. Returns how many constant values were clipped."""
    overflow = 0
    for n in m.graph.node:
        fp16 = n.name not in blocked
        for o in n.output:
            if is_float(o):
                cur[o] = F16 if fp16 else F32
        if not fp16:
            where = (f"in {pass_name}.block_ops" if n.op_type in config.block_ops else
                     f"in {pass_name}.exclude" if n.name in config.exclude else
                     "op has no fp16 form here")
            report.skip(n, f"{where} (kept in float32)")
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
    return overflow


def _output_casts(m, config, cur: dict, names: set, pass_name: str) -> list:
    """Float16 graph outputs: with ``keep_io_types`` the producer writes ``<o>_fp16`` and a
    Cast writes ``o`` (returned, to go last); without, the output is declared float16."""
    tail = []
    for o in m.graph.output:
        if cur.get(o.name) != F16:
            continue
        if not config.keep_io_types:
            o.type.tensor_type.elem_type = F16
            continue
        new = unique_name(names, f"{o.name}_fp16")
        rename_outputs(m, {o.name: new})
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                if x == o.name:
                    n.input[i] = new
        cur[new] = F16
        c = helper.make_node("Cast", [new], [o.name], to=F32,
                             name=unique_name(names, f"{o.name}/Cast_fp32"))
        set_provenance(c, pass_name, o.name, what="output cast")
        tail.append(c)
    return tail


def _input_casts(m, want: Callable, cur: dict, names: set, pass_name: str
                 ) -> tuple[list, int]:
    """The node order with a Cast before each reader that wants another dtype than its input
    has (one Cast per tensor and dtype), and how many Casts that added."""
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
                tag = "fp16" if w == F16 else "fp32"
                out = unique_name(names, f"{x}_{tag}")
                c = helper.make_node("Cast", [x], [out], to=w,
                                     name=unique_name(names, f"{x}/Cast_{tag}"))
                set_provenance(c, pass_name, x, what="cast")
                casts[key] = out
                order.append(c)
            n.input[i] = casts[key]
        order.append(n)
    return order, len(casts)


def _storage_only(m, report: PassReport, names: set, pass_name: str):
    """Weights stored fp16 with a Cast back to float32 in front of the graph."""
    head, new, overflow = [], [], 0
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
        set_provenance(c, pass_name, t.name, what="fp16 weight storage")
        head.append(c)
        report.rewrite(c.name, f"weight {t.name} stored as float16, cast to float32")
    if head:
        keep_in = [vi for vi in m.graph.input if vi.name not in {c.output[0] for c in head}]
        if len(keep_in) != len(m.graph.input):
            del m.graph.input[:]
            m.graph.input.extend(keep_in)
        del m.graph.initializer[:]
        m.graph.initializer.extend(new)
        set_nodes(m, head + list(m.graph.node))
    report.details = {"mode": "fp16", "compute": "fp32", "fp16_initializers": len(head),
                      "overflow_clipped": overflow}
    return m, report
