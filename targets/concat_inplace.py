"""Concatenation without a copy: the producers of a concatenation's inputs write straight
into their slices of its output.

A concatenation along axis ``a`` of tensors whose dimensions before ``a`` are all 1 (NCHW,
batch 1, channels) puts each input in one contiguous range of the output::

    Y = concat(X_0, .., X_k)  ==  Y[o_i : o_i + |X_i|] = X_i (flat),  o_i = sum_{j<i} |X_j|

so where each ``X_i`` is the output of one kernel call and is read by nothing but the
concatenation, ``X_i`` can *be* the range ``Y[o_i : ..]`` -- a view -- and the copy vanishes::

    X_0 = f(..); X_1 = g(..); Y = concat(X_0, X_1)
      ->  Y = alloc; f(.., view(Y, o_0)); g(.., view(Y, o_1))

This runs on the VM's explicit allocations (after ``CallTIRRewrite``, before memory
planning): ``Y``'s allocation moves before the first producer, which the planner then keeps
alive across the producers. A view carries its offset as the tensor's byte offset, which a
kernel compiled for offset-0 buffers rejects, so each producer's output parameter is
re-declared with a symbolic element offset (:func:`accept_offset`; offset 0 still works,
so the function's other calls are unchanged). Offsets are kept multiples of 64 bytes, the
alignment the kernels assume for their buffers; a concatenation with an input that is not
a kernel's sole output, is read elsewhere, or would sit unaligned keeps its copy.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

ALIGN_BYTES = 64  # kernels assume their buffers 64-byte aligned
CONCAT_BLOCK = "T_concat"
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
        blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
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


def _static(ty) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values), str(ty.dtype)
    except (TypeError, AttributeError):
        return None


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
        for i, b in enumerate(bindings):
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(_ALLOC):
                self.root[b.var] = b.var
                self.alloc_at[b.var] = i
                self.uses[b.var] = []
            elif isinstance(v, relax.Var) and v in self.root:
                self.root[b.var] = self.root[v]
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
            if var in self.root:
                self.uses[self.root[var]].append((-1, -1))


def _plan(mod, concats: set, blk: _Block, index: int):
    """For the concatenation at binding ``index``: ``(output alloc, [(input alloc, producer
    function, byte offset)])``, or None where it must stay a copy."""
    call = blk.bindings[index].value
    if not (isinstance(call.op, tvm.ir.GlobalVar) and call.op in concats):
        return None
    args = list(call.args)
    if not all(isinstance(a, relax.Var) and a in blk.root for a in args):
        return None
    out = blk.root[args[-1]]
    ins = [blk.root[a] for a in args[:-1]]
    if len(set(ins)) != len(ins) or out in ins:
        return None
    static = [_static(a.ty) for a in args]
    if any(s is None for s in static):
        return None
    shapes = [s[0] for s in static]
    axis = _axis(shapes[:-1], shapes[-1])
    if axis is None or any(d != 1 for d in shapes[-1][:axis]):
        return None
    itemsize = tvm.DataType(static[-1][1]).bits // 8
    row = itemsize
    for d in shapes[-1][axis + 1:]:
        row *= d
    plan, offset = [], 0
    for a, shape in zip(ins, shapes[:-1]):
        uses = blk.uses[a]
        writes = [(i, k) for i, k in uses if i != index]
        if len(uses) != 2 or len(writes) != 1 or offset % ALIGN_BYTES:
            return None
        i, k = writes[0]
        prod = blk.bindings[i].value
        if not (isinstance(prod.op, tvm.ir.GlobalVar) and k == len(prod.args) - 1 and i < index
                and isinstance(mod[prod.op], tirx.PrimFunc) and prod.op not in concats
                and len(mod[prod.op].params) == len(prod.args)):
            return None
        plan.append((a, prod.op, offset))
        offset += shape[axis] * row
    return out, plan


def concat_inplace_pass(record=None):
    """Relax module pass (VM form, before memory planning): concatenations whose inputs'
    producers can write into the output directly lose their copy (module docstring). The
    number of copies removed goes to ``record.concat_views``; a concatenation function no
    longer called leaves the module (and ``record.kernels``)."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecConcatInPlace")
    def _pass(mod, _ctx):
        offset_funcs: set = set()
        removed = [0]
        concats = {gv for gv, f in mod.functions.items() if _tagged(f)}
        if not concats:
            return mod
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            blocks = [relax.BindingBlock(_rewrite_block(mod, concats, list(b.bindings),
                                                        func.body.body, offset_funcs, removed))
                      if not isinstance(b, relax.DataflowBlock) else b
                      for b in func.body.blocks]
            body = relax.SeqExpr(blocks, func.body.body)
            mod[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure,
                                     func.attrs)
        for gv in offset_funcs:
            func = mod[gv]
            mod[gv] = accept_offset(func, len(func.params) - 1)
        called = _called(mod)
        for gv in concats - called:
            del mod[gv]
            if record is not None:
                record.kernels.pop(gv.name_hint, None)
        if record is not None:
            record.concat_views += removed[0]
        return mod

    return _pass


def _called(mod) -> set:
    """The global functions some Relax function of ``mod`` refers to."""
    seen: set = set()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: seen.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return seen


def _rewrite_block(mod, concats: set, bindings: list, result, offset_funcs: set,
                   removed: list) -> list:
    blk = _Block(bindings)
    blk.escape(result)
    plans = [(i, p) for i, p in ((i, _plan(mod, concats, blk, i)) for i, b in enumerate(bindings)
                                 if isinstance(b.value, relax.Call)
                                 and isinstance(b.value.op, tvm.ir.GlobalVar)) if p]
    if not plans:
        return bindings
    removed[0] += len(plans)
    drop = {i for i, _ in plans}            # the copies
    hoist = {}                              # binding index -> output allocations moved there
    views = {}                              # input allocation -> (output, byte offset)
    for i, (out, inputs) in plans:
        drop.add(blk.alloc_at[out])
        hoist.setdefault(min(blk.alloc_at[a] for a, _, _ in inputs), []).append(
            bindings[blk.alloc_at[out]])
        for a, func, offset in inputs:
            views[a] = (out, offset)
            offset_funcs.add(func)
    new = []
    for i, b in enumerate(bindings):
        new.extend(hoist.get(i, []))
        if i in drop:
            continue
        if b.var in views:
            out, offset = views[b.var]
            shape, dtype = _static(b.var.ty)
            b = relax.VarBinding(b.var, relax.op.memory.view(
                out, shape=shape, dtype=dtype,
                relative_byte_offset=relax.prim_value(tirx.IntImm("int64", offset))))
        new.append(b)
    return new
