"""Concatenation without a copy: the producers of a concatenation's inputs write straight
into their slices of its output.

A concatenation along axis ``a`` of tensors whose dimensions before ``a`` are all 1 (NCHW,
batch 1, channels) puts each input in one contiguous range of the output::

    Y = concat(X_0, .., X_k)  ==  Y[o_i : o_i + |X_i|] = X_i (flat),  o_i = sum_{j<i} |X_j|

so where each ``X_i`` is written by one kernel call and read, besides the concatenation,
only by kernel calls that run before it (a U-Net skip connection's down path, YOLO's SPPF
pooling chain, C2f's split halves), ``X_i`` can *be* the range ``Y[o_i : ..]`` -- a view --
and the copy vanishes::

    X_0 = f(..); X_1 = g(X_0); Y = concat(X_0, X_1)
      ->  Y = alloc; f(.., view(Y, o_0)); g(view(Y, o_0), view(Y, o_1))

This runs on the VM's explicit allocations (after ``CallTIRRewrite``, before memory
planning): ``Y``'s allocation moves before the first producer, and the planner keeps it
alive from there to ``Y``'s last reader, which is after every use of its views. A view
carries its offset in the tensor, which a kernel compiled for offset-0 buffers rejects, so
each parameter that receives a view (writer or reader) is re-declared with a symbolic
element offset (:func:`accept_offset`; offset 0 still binds, so the function's other
calls are unchanged). Offsets are kept multiples of 64 bytes, the alignment the kernels
assume. A concatenation keeps its copy where an input is a model input or constant, is read
after the concatenation or by something other than a kernel, would sit unaligned, is
another concatenation's output, or where the slices are not contiguous (batch > 1).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..kernels.concat import CONCAT_BLOCK
from ..schedule import all_blocks
from .common import static_shape

ALIGN_BYTES = 64  # kernels assume their buffers 64-byte aligned
PLAIN_CONCAT_ATTR = "edgec.plain_concat"  # set before scheduling: the function only copies

_ALLOC = tvm.ir.Op.get("relax.builtin.alloc_tensor")


def accept_offset(func: tirx.PrimFunc, index: int) -> tirx.PrimFunc:
    """``func`` with buffer parameter ``index`` re-declared with a symbolic element offset
    (a multiple of ``ALIGN_BYTES``): the body keeps addressing the original buffer, declared
    at the offset element's address."""
    buf = func.params[index]
    itemsize = tvm.DataType(buf.dtype).bits // 8
    offset = tirx.Var(f"{buf.name}_elem_offset", "int64")
    view = tirx.decl_buffer(buf.shape, buf.dtype, f"{buf.name}_view", elem_offset=offset,
                            offset_factor=ALIGN_BYTES // itemsize, data_alignment=ALIGN_BYTES)
    first = tirx.BufferLoad(view, [tirx.IntImm("int64", 0)] * len(buf.shape))
    body = tirx.SeqStmt([tirx.DeclBuffer(buf, data=tirx.address_of(first)), func.body])
    params = list(func.params)
    params[index] = view
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


def _is_copy(value) -> bool:
    """A stored value that only picks an input element (loads behind selects)."""
    if isinstance(value, tvm.ir.TensorLoad):
        return True
    if isinstance(value, tirx.Select):
        return _is_copy(value.true_value) and _is_copy(value.false_value)
    if isinstance(value, tvm.ir.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else")):
        return _is_copy(value.args[1]) and _is_copy(value.args[2])
    return False
    return False


def is_plain_concat(func) -> bool:
    """A function (unscheduled) that is one concatenation and nothing else (no fused
    epilogue)."""
    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        sch = tvm.s_tir.Schedule(func)
        blocks = [sch.get(b) for b in all_blocks(sch)]
    except Exception:  # noqa: BLE001 -- not block-form TIR: not ours to judge
        return False
    return len(blocks) == 1 and blocks[0].name_hint == CONCAT_BLOCK and \
        isinstance(blocks[0].body, tirx.BufferStore) and _is_copy(blocks[0].body.value)


def mark_plain_concats():
    """PrimFunc pass, before scheduling (which leaves the concatenation's block hard to
    read): tag the functions that are one plain concatenation (:data:`PLAIN_CONCAT_ATTR`)."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecMarkPlainConcats")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if is_plain_concat(func):
                mod[gv] = func.with_attr(PLAIN_CONCAT_ATTR, True)
        return mod

    return _pass


def _tagged(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and \
        bool(func.attrs.get(PLAIN_CONCAT_ATTR, False))


def _axis(shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> int | None:
    """The one axis along which ``shapes`` concatenate into ``out``."""
    axes = [a for a in range(len(out))
            if all(len(s) == len(out) for s in shapes)
            and sum(s[a] for s in shapes) == out[a]
            and all(s[d] == out[d] for s in shapes for d in range(len(out)) if d != a)]
    return axes[0] if len(axes) == 1 else None


class _Block:
    """Who allocates, writes and reads each tensor of one binding block."""

    def __init__(self, bindings):
        self.bindings = bindings
        self.root = {}     # var -> the allocation it aliases
        self.alloc_at = {}  # allocation var -> binding index
        self.uses = {}     # allocation var -> [(binding index, argument index)]
        self.tuples = {}   # var -> the allocations a tuple of a multi-output call holds
        for i, b in enumerate(bindings):
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(_ALLOC):
                self.root[b.var] = b.var
                self.alloc_at[b.var] = i
                self.uses[b.var] = []
            elif isinstance(v, relax.Var) and v in self.root:
                self.root[b.var] = self.root[v]
            elif isinstance(v, relax.Tuple) and \
                    all(isinstance(f, relax.Var) and f in self.root for f in v.fields):
                self.tuples[b.var] = [self.root[f] for f in v.fields]
            elif isinstance(v, relax.TupleGetItem) and v.tuple_value in self.tuples:
                self.root[b.var] = self.tuples[v.tuple_value][v.index]
            elif isinstance(v, relax.Call):
                for k, a in enumerate(v.args):
                    if isinstance(a, relax.Var) and a in self.root:
                        self.uses[self.root[a]].append((i, k))
                    else:
                        self.escape(a)
            else:
                self.escape(v)

    def escape(self, expr) -> None:
        """Every tensor ``expr`` mentions is read in a way the rewrite does not follow."""
        for var in relax.analysis.free_vars(expr):
            for alloc in self.tuples.get(var, [self.root.get(var)]):
                if alloc is not None:
                    self.uses[alloc].append((-1, -1))


def _is_kernel_call(mod, concats: set, value) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) and \
        isinstance(mod[value.op], tirx.PrimFunc) and value.op not in concats and \
        len(mod[value.op].params) == len(value.args)


def _plan(mod, concats: set, blk: _Block, index: int):
    """For the concatenation at binding ``index``: ``(output alloc, [(input alloc, [(kernel,
    parameter)] that write or read it, byte offset)])``, or None where it must stay a copy.

    An input qualifies when its first use (a fresh allocation's first use writes it) is a
    kernel call that takes it once, and every other use is a kernel call that reads it
    before the concatenation (when the output is alive: the planner sees the output's
    uses, not its views')."""
    call = blk.bindings[index].value
    if not (isinstance(call.op, tvm.ir.GlobalVar) and call.op in concats):
        return None
    args = list(call.args)
    if not all(isinstance(a, relax.Var) and a in blk.root for a in args):
        return None
    out = blk.root[args[-1]]
    ins = [blk.root[a] for a in args[:-1]]
    if len(set(ins)) != len(ins) or out in ins or \
            not any(i != index for i, _ in blk.uses[out]):  # an unread output: leave it
        return None
    shapes = [static_shape(a) for a in args]
    if any(s is None for s in shapes):
        return None
    axis = _axis(shapes[:-1], shapes[-1])
    if axis is None or any(d != 1 for d in shapes[-1][:axis]):
        return None
    row = tvm.DataType(args[-1].ty.dtype).bits // 8
    for d in shapes[-1][axis + 1:]:
        row *= d
    plan, offset = [], 0
    for a, shape in zip(ins, shapes[:-1]):
        uses = sorted(u for u in blk.uses[a] if u[0] != index)
        if offset % ALIGN_BYTES or not uses or uses[0][0] < 0 or \
                any(i < 0 or i > index or
                    not _is_kernel_call(mod, concats, blk.bindings[i].value) for i, _ in uses):
            return None
        if [j for j, _ in uses].count(uses[0][0]) != 1:  # the writer takes it once
            return None
        plan.append((a, [(blk.bindings[i].value.op, k) for i, k in uses], offset))
        offset += shape[axis] * row
    return out, plan


def concat_inplace_pass(record=None):
    """Relax module pass (VM form, before memory planning): concatenations whose inputs'
    producers can write into the output directly lose their copy (module docstring). The
    number of copies removed goes to ``record.concat_views``; a concatenation function no
    longer called leaves the module (and ``record.kernels``)."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecConcatInPlace")
    def _pass(mod, _ctx):
        offset_funcs: dict = {}  # function -> parameters that take an offset
        concats = {gv for gv, f in mod.functions.items() if _tagged(f)}
        if not concats:
            return mod
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            blocks = []
            for b in func.body.blocks:
                if not isinstance(b, relax.DataflowBlock):
                    bindings, removed = _rewrite_block(mod, concats, list(b.bindings),
                                                       func.body.body, offset_funcs)
                    b = relax.BindingBlock(bindings)
                    if record is not None:
                        record.concat_views += removed
                blocks.append(b)
            body = relax.SeqExpr(blocks, func.body.body)
            mod[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure,
                                     func.attrs)
        for gv, params in offset_funcs.items():
            func = mod[gv]
            for k in sorted(params):
                func = accept_offset(func, k)
            mod[gv] = func
        called = _called(mod)
        for gv in concats - called:
            del mod[gv]
            if record is not None:
                record.kernels.pop(gv.name_hint, None)
        return mod

    return _pass


def _called(mod) -> set:
    """The global functions some Relax function of ``mod`` refers to. (Not Relax's
    DeadCodeElimination: after CallTIRRewrite a kernel call's result is an unused binding of
    a function marked pure, which it would drop.)"""
    seen: set = set()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: seen.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return seen


def _rewrite_block(mod, concats: set, bindings: list, result,
                   offset_funcs: dict) -> tuple[list, int]:
    """``bindings`` with the copies of :func:`_plan`'s concatenations removed, and how many;
    the kernels that now receive views go to ``offset_funcs``."""
    blk = _Block(bindings)
    blk.escape(result)
    plans, claimed = [], set()
    for i, b in enumerate(bindings):
        plan = _plan(mod, concats, blk, i) if isinstance(b.value, relax.Call) else None
        if plan and not claimed & {a for a, _, _ in plan[1]}:  # a tensor is one view
            plans.append((i, plan))
            claimed |= {a for a, _, _ in plan[1]}
    if not plans:
        return bindings, 0
    drop = {i for i, _ in plans}            # the copies
    hoist = {}                              # binding index -> output allocations moved there
    views = {}                              # input allocation -> (output, byte offset)
    for i, (out, inputs) in plans:
        drop.add(blk.alloc_at[out])
        hoist.setdefault(min(blk.alloc_at[a] for a, _, _ in inputs), []).append(
            bindings[blk.alloc_at[out]])
        for a, calls, offset in inputs:
            views[a] = (out, offset)
            for func, param in calls:  # a view's offset is in the tensor its kernels get
                offset_funcs.setdefault(func, set()).add(param)
    new = []
    for i, b in enumerate(bindings):
        new.extend(hoist.get(i, []))
        if i in drop:
            continue
        if b.var in views:
            out, offset = views[b.var]
            b = relax.VarBinding(b.var, relax.op.memory.view(
                out, shape=static_shape(b.var), dtype=str(b.var.ty.dtype),
                relative_byte_offset=relax.prim_value(tirx.IntImm("int64", offset))))
        new.append(b)
    return new, len(plans)
