"""Default CPU kernels for LLVM targets (x86 AVX2/AVX-512, aarch64 NEON), no tuning needed.

Convolution (groups = 1) is legalized into a direct convolution with **weights packed at
compile time** and an output computed in register tiles::

    Wp[oc // B, ic, kh, kw, oc % B] = W[oc, ic, kh, kw]                  (numpy, at compile time)
    P[n, ob, oh, ow, b] = sum_{ic,kh,kw} X[n, ic, oh*s+kh*d, ow*s+kw*d] * Wp[ob, ic, kh, kw, b]
    Y[n, oc, oh, ow]    = epilogue(P[n, oc // B, oh, ow, oc % B])        (bias, BN, ReLU, Add...)

``B`` is the SIMD width in floats (16 on AVX-512, 8 on AVX2, 4 on NEON). The inner kernel
keeps ``R x B`` accumulators in registers (``R`` output columns, one vector of ``B`` output
channels): per reduction step one weight vector load, ``R`` broadcasts of input scalars and
``R`` FMAs. The graph stays NCHW, so no layout transforms are inserted between layers; the
epilogue is applied per tile while it is in registers/L1.

Depthwise convolution vectorizes over output columns with the taps unrolled. Every other
fused function gets a generic schedule: outer loops fused and parallelized, the innermost
loop vectorized when it is a plain spatial loop.

Everything here is a rewrite of the schedule only: the math is the ONNX graph's. A function
whose schedule fails keeps its (correct, slow) default loops.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from .backend import relax, tvm
from .cpu_int8_winograd import WINO8_GEMM_BLOCK
from .cpu_winograd import (WINO_GEMM_BLOCK, WINO_OUT1_BLOCK, schedule_winograd,
                           transform_weight, winograd_te, winograd_tile)

log = logging.getLogger("edgec.cpu_kernels")

CONV_BLOCK = "edgec_conv2d_packed"
INT8_CONV_BLOCK = "edgec_conv2d_int8"
INT8_PX_BLOCK = "edgec_conv2d_int8px"
DWCONV_BLOCK = "edgec_dwconv2d"
CONV_PX_BLOCK = "edgec_conv2d_px"
PX_TILE = "edgec_px_tile"  # block annotation of a pixels-in-lanes kernel: [vecs, rows]


# ---------------------------------------------------------------------------------- vector width
def simd_floats(target) -> int:
    """float32 lanes of the target's widest vector unit."""
    keys = str(target).lower()
    if "aarch64" in keys or "arm" in keys:
        return 4
    feats = set()
    try:
        feats = {str(f).lower() for f in target.attrs.get("mattr", [])}
    except Exception:  # noqa: BLE001
        pass
    mcpu = str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""
    if any("avx512f" in f for f in feats) or _mcpu_has_avx512(mcpu):
        return 16
    return 8


def _mcpu_has_avx512(mcpu: str) -> bool:
    mcpu = mcpu.lower()
    return mcpu.startswith(("skylake-avx512", "cascadelake", "cooperlake", "icelake",
                            "tigerlake", "sapphirerapids", "emeraldrapids", "graniterapids",
                            "znver4", "znver5", "rocketlake", "cannonlake", "x86-64-v4"))


# ---------------------------------------------------------------------------------- legalization
def _ints(xs) -> list[int]:
    return [int(x) for x in xs]


def make_conv2d_legalizer(lanes: int):
    """A LegalizeOps override for relax.nn.conv2d: packed direct conv (groups = 1, constant
    weights, NCHW/OIHW) and depthwise conv; anything else goes to TOPI's default."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d as default

    def legalize(bb, call):
        attrs = call.attrs
        data, weight = call.args
        if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
                or attrs.out_layout != "NCHW" or not isinstance(weight, tvm.ir.expr.Constant)):
            return default(bb, call)
        dshape = data.ty.shape
        if dshape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dshape.values):
            return default(bb, call)
        dtype = str(data.ty.dtype)
        if dtype != "float32" or (attrs.out_dtype not in (None, "", "float32")):
            return default(bb, call)
        w = weight.value.numpy()
        groups = int(attrs.groups)
        n, c, h, wd = _ints(dshape.values)
        oc = w.shape[0]
        strides, dil = _ints(attrs.strides), _ints(attrs.dilation)
        pads = _ints(attrs.padding)
        m = winograd_tile(lanes, (n, c, h, wd), w.shape, strides, pads, dil, groups)
        if m is not None:
            return bb.call_te(functools.partial(winograd_te, m=m), data,
                              relax.const(transform_weight(w, m, lanes)), oc, pads,
                              primfunc_name_hint="conv2d_winograd",
                              primfunc_attrs={"op_pattern": 4})
        tile = conv_px_tile(lanes, (n, c, h, wd), w.shape, strides, pads) \
            if groups == 1 else None
        if tile is not None:
            rows = tile[4]
            ocb = -(-oc // rows)
            wpx = np.zeros((ocb * rows, c), w.dtype)
            wpx[:oc] = w.reshape(oc, c)
            wpx = np.ascontiguousarray(wpx.reshape(ocb, rows, c).transpose(0, 2, 1))
            return bb.call_te(functools.partial(conv1x1_px_te, tile=tile), data,
                              relax.const(wpx), oc, primfunc_name_hint="conv2d_px",
                              primfunc_attrs={"op_pattern": 4})
        if groups == 1:
            occ = -(-oc // lanes)
            wp = np.zeros((occ * lanes,) + w.shape[1:], w.dtype)
            wp[:oc] = w
            wp = np.ascontiguousarray(
                wp.reshape(occ, lanes, *w.shape[1:]).transpose(0, 2, 3, 4, 1))
            return bb.call_te(_conv_packed_te, data, relax.const(wp), oc, strides, pads, dil,
                              primfunc_name_hint="conv2d_packed",
                              primfunc_attrs={"op_pattern": 4})
        if groups == c and oc == c and w.shape[1] == 1:
            return bb.call_te(functools.partial(dwconv_te, lanes=lanes), data, weight,
                              strides, pads, dil, primfunc_name_hint="dwconv2d",
                              primfunc_attrs={"op_pattern": 4})
        return default(bb, call)

    return legalize


def px_budget(lanes: int) -> int:
    """float accumulators per pixels-in-lanes tile: 15 zmm (AVX-512; 1 KiB), 12 of 16 ymm
    (AVX2), 24 of 32 q (NEON)."""
    return 15 if lanes >= 16 else 12 if lanes == 8 else 24


def conv_px_tile(lanes: int, shape, wshape, strides, pads):
    """The :func:`px_tile` of a 1x1 stride-1 unpadded float convolution, else None."""
    n, c, h, w = shape
    if tuple(wshape[2:]) != (1, 1) or list(strides) != [1, 1] or any(pads):
        return None
    return px_tile(lanes, px_budget(lanes), h, w, 4 * c, int(wshape[0]))


def conv1x1_px_te(x, wpx, oc: int, tile):
    """1x1 stride-1 convolution as ``W[O x C] . X[C x pixels]`` with pixels in the lanes::

        acc[n, o, y, x] = sum_c X[n, c, y, x] * Wt[o // R, c, o % R]

    over the map as :func:`px_tile` views it (one flat row of ``H*W`` pixels when they fill
    whole vectors -- no copy at all -- else rows padded to whole vectors). Per input
    channel a tile loads ``vecs`` pixel vectors and broadcasts ``R`` weights; the NCHW
    output rows are the accumulators themselves, so the fused epilogue (bias, BN, ReLU,
    residual Add) reads and writes whole vectors with no transpose -- which the
    channels-in-lanes kernel needs, and which costs more than the multiply-adds when
    there are few input channels (MobileNet's expansions and projections)."""
    from tvm import te

    nb, c, h, w = _ints(x.shape)
    ocb, ic, rows = _ints(wpx.shape)
    hv, wv, wpad, vecs, _ = tile
    if hv == 1 and h > 1:
        def xin(n, c_, y, xx):
            return x[n, c_, xx // w, xx % w]
    elif wpad != w:
        xp = te.compute((nb, c, h, wpad), lambda n, c_, y, xx: tvm.tirx.if_then_else(
            tvm.tirx.likely(xx < w), x[n, c_, y, tvm.tirx.min(xx, w - 1)],
            tvm.tirx.const(0.0, "float32")), name="edgec_pad")

        def xin(n, c_, y, xx):
            return xp[n, c_, y, xx]
    else:
        def xin(n, c_, y, xx):
            return x[n, c_, y, xx]
    rc = te.reduce_axis((0, ic), "rc")
    acc = te.compute((nb, ocb * rows, hv, wpad),
                     lambda n, o, y, xx: te.sum(xin(n, rc, y, xx) * wpx[o // rows, rc, o % rows],
                                                axis=rc),
                     name=CONV_PX_BLOCK, attrs={PX_TILE: [vecs, rows]})
    if hv == 1 and h > 1:
        return te.compute((nb, oc, h, w), lambda n, o, y, xx: acc[n, o, 0, y * w + xx],
                          name="edgec_conv2d_px_out")
    return te.compute((nb, oc, h, w), lambda n, o, y, xx: acc[n, o, y, xx],
                      name="edgec_conv2d_px_out")


def make_maxpool_legalizer(lanes: int):
    """relax.nn.max_pool2d (NCHW, floor mode, static shape) through :func:`dwconv_te`'s row
    kernel: column phases for the stride, whole-vector rows, the taps unrolled. TOPI's
    pool is left with a reduction innermost that the generic schedule cannot vectorize."""
    from tvm.relax.transform.legalize_ops.nn import _nn_max_pool2d as default

    def legalize(bb, call):
        a = call.attrs
        x = call.args[0]
        shape = x.ty.shape
        if (a.layout != "NCHW" or a.out_layout != "NCHW" or bool(a.ceil_mode) or shape is None
                or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values)
                or len(shape.values) != 4):
            return default(bb, call)
        return bb.call_te(functools.partial(dwconv_te, lanes=lanes, pool=_ints(a.pool_size)),
                          x, None, _ints(a.strides), _ints(a.padding), _ints(a.dilation),
                          primfunc_name_hint="max_pool2d", primfunc_attrs={"op_pattern": 4})

    return legalize


def _pad(x, pads, load=None):
    """Zero padding whose bounds test is marked ``likely``, so TIR's LoopPartition
    splits off an interior that copies without tests (topi.nn.pad does not mark it).
    ``load(n, c, y, x)`` (default ``x[n, c, y, x]``) reads one float input value, e.g.
    dequantizing an 8-bit input."""
    from tvm import te

    pt, pl, pb, pr = pads
    if not any(pads) and load is None:
        return x
    load = load or (lambda *i: x[i])
    nb, c, h, w = _ints(x.shape)

    def body(n, c_, y, xx):
        inside = tvm.tirx.all(y >= pt, y < h + pt, xx >= pl, xx < w + pl)
        return tvm.tirx.if_then_else(tvm.tirx.likely(inside), load(n, c_, y - pt, xx - pl),
                                     tvm.tirx.const(0.0, "float32"))

    return te.compute((nb, c, h + pt + pb, w + pl + pr), body, name="edgec_pad")


def _conv_packed_te(x, wp, oc, strides, pads, dil):
    from tvm import te

    _, _, h, w = _ints(x.shape)
    occ, ic, kh, kw, lanes_ = _ints(wp.shape)
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    xp = _pad(x, pads)
    ric = te.reduce_axis((0, ic), "ric")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    nb = _ints(x.shape)[0]
    packed = te.compute(
        (nb, occ, oh, ow, lanes_),
        lambda n, o, y, xx, b: te.sum(
            xp[n, ric, y * sh + rkh * dh, xx * sw + rkw * dw] * wp[o, ric, rkh, rkw, b],
            axis=[ric, rkh, rkw]),
        name=CONV_BLOCK)
    return te.compute((nb, oc, oh, ow),
                      lambda n, c_, y, xx: packed[n, c_ // lanes_, y, xx, c_ % lanes_],
                      name="edgec_conv2d_unpack")


def dw_vector(ow: int, lanes: int) -> int:
    """Vector width for a depthwise output row of ``ow`` pixels: the fewest vectors, and
    of those the narrowest (a 7-pixel row is one 8-lane vector, not a 16-lane one)."""
    widths = [u for u in (16, 8, 4) if u <= max(lanes, 4)]
    return min(widths, key=lambda u: (-(-ow // u), u))


def dwconv_te(x, wt, strides, pads, dil, load=None, lanes: int = 8, finish=None, pool=None):
    """Depthwise convolution, one padded row of vectors at a time::

        Xs_p[n, c, y, j] = Xpad[n, c, y, j * sw + p]                 (column phases)
        acc[n, c, y, x]  = sum_{i, k} Xs_{(k*dw) % sw}[n, c, y*sh + i*dh, x + (k*dw) // sw]
                                      * W[c, 0, i, k]                 for x < Wp
        Y[n, c, y, x]    = finish(acc[n, c, y, x])                    for x < Wo

    The row is padded to whole vectors (``Wp``, :func:`dw_vector`), so every tap is one
    unaligned vector load and one FMA per vector and the accumulators of a row stay in
    registers; the columns beyond ``Wo`` are computed from padding and never read. With
    ``sw`` column phases every tap of a strided convolution reads contiguous columns.
    ``load(n, c, y, x)`` (default ``x[n, c, y, x]``) reads one float input value, e.g.
    dequantizing an 8-bit input; ``finish(v, n, c, y, x)`` (default ``v``) maps a sum to
    the output value, e.g. requantizing it. With ``wt = None`` and ``pool = (kh, kw)`` it is
    a max pool instead (``max`` over the taps, padding with the type's lowest value) in the
    input's own type."""
    from tvm import te

    nb, c, h, w = _ints(x.shape)
    kh, kw = pool if wt is None else _ints(wt.shape)[2:]
    if wt is None:
        dt = str(x.dtype)
        fill = tvm.tirx.min_value(dt)
    else:
        fill = tvm.tirx.const(0.0, "float32")
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    v = dw_vector(ow, lanes)
    owp = -(-ow // v) * v
    cols = owp + ((kw - 1) * dw) // sw
    rows = (oh - 1) * sh + (kh - 1) * dh + 1
    load = load or (lambda *i: x[i])
    rkh = te.reduce_axis((0, kh), "rkh")

    def phase(p):
        def body(n, c_, y, j):
            col = j * sw + p - pl
            row = y - pt
            # only the tests that can fail (one that always holds would be simplified away
            # together with the ``likely`` that lets LoopPartition split off the interior)
            tests = [t for t, can_fail in ((row >= 0, pt > 0), (row < h, rows - pt > h),
                                           (col >= 0, p < pl),
                                           (col < w, (cols - 1) * sw + p - pl >= w))
                     if can_fail]
            out = load(n, c_, row, col)
            for t in reversed(tests):  # one test per likely: LoopPartition deduces each bound
                out = tvm.tirx.if_then_else(tvm.tirx.likely(t), out, fill)
            return out
        return body

    # one buffer per column phase (p a constant: the bounds tests split off cleanly)
    xs = {p: te.compute((nb, c, rows, cols), phase(p), name=f"edgec_pad_p{p}")
          for p in sorted({(k * dw) % sw for k in range(kw)})}
    if wt is None:  # max pool: the same taps, max instead of multiply-add
        def tap(n, c_, y, xx, k):
            return xs[(k * dw) % sw][n, c_, y * sh + rkh * dh, xx + (k * dw) // sw]

        acc = te.compute(
            (nb, c, oh, owp),
            lambda n, c_, y, xx: te.max(functools.reduce(
                tvm.tirx.max, [tap(n, c_, y, xx, k) for k in range(kw)]), axis=[rkh]),
            name=DWCONV_BLOCK)
    elif sw == 1:
        rkw = te.reduce_axis((0, kw), "rkw")
        acc = te.compute(
            (nb, c, oh, owp),
            lambda n, c_, y, xx: te.sum(
                xs[0][n, c_, y * sh + rkh * dh, xx + rkw * dw] * wt[c_, 0, rkh, rkw],
                axis=[rkh, rkw]),
            name=DWCONV_BLOCK)
    else:  # the taps of a kernel row written out: each reads its phase's buffer
        def strided(n, c_, y, xx):
            terms = [xs[(k * dw) % sw][n, c_, y * sh + rkh * dh, xx + (k * dw) // sw]
                     * wt[c_, 0, rkh, k] for k in range(kw)]
            return te.sum(functools.reduce(lambda a, b: a + b, terms), axis=[rkh])
        acc = te.compute((nb, c, oh, owp), strided, name=DWCONV_BLOCK)
    finish = finish or (lambda v, *i: v)
    return te.compute((nb, c, oh, ow),
                      lambda n, c_, y, xx: finish(acc[n, c_, y, xx], n, c_, y, xx),
                      name="edgec_dwconv2d_crop")


def make_fast_math_legalizers() -> dict:
    """sigmoid(x) = 1 / (1 + exp(-x)) and tanh with TVM's polynomial ``fast_exp`` /
    ``fast_tanh`` (relative error ~1e-7 over the float range) instead of libm calls, so
    SiLU/Swish epilogues vectorize."""
    from tvm import te, topi

    def sigmoid_te(x):
        e = topi.fast_exp(topi.negative(x))
        return te.compute(x.shape, lambda *i: tvm.tirx.const(1.0, x.dtype) /
                          (tvm.tirx.const(1.0, x.dtype) + e(*i)), name="edgec_sigmoid")

    def _float32(call):
        return str(call.args[0].ty.dtype) == "float32"

    def sigmoid(bb, call):
        from tvm.relax.transform.legalize_ops.unary import _call_topi_without_attr

        if not _float32(call):
            return _call_topi_without_attr(topi.sigmoid, "tir_sigmoid")(bb, call)
        return bb.call_te(sigmoid_te, call.args[0], primfunc_name_hint="tir_sigmoid")

    def tanh(bb, call):
        if not _float32(call):
            return bb.call_te(topi.tanh, call.args[0], primfunc_name_hint="tir_tanh")
        return bb.call_te(topi.fast_tanh, call.args[0], primfunc_name_hint="tir_tanh")

    return {"relax.sigmoid": sigmoid, "relax.tanh": tanh}


# ---------------------------------------------------------------------------------- schedules
def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


def _pick_tile(n: int, limit: int) -> int:
    """Largest divisor of n not above limit (at least 1)."""
    for t in range(min(n, limit), 0, -1):
        if n % t == 0:
            return t
    return 1


def _find_blocks(sch, prefix: str) -> list:
    out = []
    for b in _all_blocks(sch):
        if sch.get(b).name_hint.startswith(prefix):
            out.append(b)
    return out


def _all_blocks(sch) -> list:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def _fuse_epilogue(sch, producer, loop, prepare=None) -> list:
    """Move everything computed from ``producer`` (the unpack and the fused elementwise
    epilogue, a chain or a DAG such as ``x * sigmoid(x)``) under its tile loop ``loop``.

    Injective intermediate blocks are inlined into their readers first (recomputing an
    elementwise value is cheaper than storing it); what remains is placed at ``loop`` in
    dataflow order, so each tile is finished while it is in registers / L1 (``prepare``, if
    given, is applied to each block just before it moves)."""
    blocks = _all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    # an elementwise side input of the epilogue (e.g. a residual's dequantize) computed
    # before the kernel: inline it into its reader, else the epilogue cannot move
    for blk, name in zip(blocks[:start - 1], names):
        if not name.startswith(("edgec_pad", "edgec_wino")):
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001
                pass
    blocks = _all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    for blk in blocks[start:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - e.g. a reduction in the epilogue: keep it
            pass
    blocks = _all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    moved = []
    for blk in blocks[start:]:
        if prepare is not None:
            prepare(blk)
        sch.reverse_compute_at(blk, loop, preserve_unit_loops=True)
        moved.append(blk)
    return moved


def _vectorize_innermost(sch, blocks) -> None:
    for blk in blocks or []:
        try:
            sch.vectorize(sch.get_loops(blk)[-1])
        except Exception:  # noqa: BLE001 - a scalar epilogue is still correct
            pass




def _parallel_pad(sch) -> None:
    for b in _find_blocks(sch, "edgec_pad"):
        loops = sch.get_loops(b)
        if len(loops) >= 2:
            sch.parallel(sch.fuse(*loops[:2]))


def schedule_conv(sch, block, lanes: int, max_cols: int) -> None:
    """Register tile: ``ob2`` vectors of output channels x ``cols`` output columns; per
    reduction step ``ob2`` weight-vector loads and ``cols`` input broadcasts feed
    ``ob2 * cols`` FMAs. Narrow rows (7x7 maps) take two or three channel blocks, else a
    7-column tile would load nearly once per FMA."""
    n, o, y, x, b, ric, rkh, rkw = sch.get_loops(block)
    oo, oi, xo, xi = register_tile(sch, o, x, max_cols)
    sch.reorder(n, oo, y, xo, ric, rkh, rkw, oi, xi, b)
    epilogue = _fuse_epilogue(sch, block, xo)
    sch.parallel(sch.fuse(n, oo, y))
    sch.vectorize(b)
    sch.unroll(oi)
    sch.unroll(xi)
    sch.decompose_reduction(block, ric)
    _vectorize_innermost(sch, epilogue)  # along the tile's columns: contiguous NCHW stores
    _parallel_pad(sch)


def register_tile(sch, o, x, max_cols: int):
    """Split the channel-block loop ``o`` and the column loop ``x`` into a register tile:
    ``cols`` columns (a divisor of ``x`` up to ``max_cols``) x ``ob2`` channel blocks (2 or 3
    when the columns leave room for them). Returns ``(oo, oi, xo, xi)``."""
    cols = _pick_tile(_extent(sch, x), max_cols)
    oe = _extent(sch, o)
    ob2 = next((k for k in (3, 2) if k * cols <= max_cols and oe % k == 0), 1)
    oo, oi = sch.split(o, [None, ob2])
    xo, xi = sch.split(x, [None, cols])
    return oo, oi, xo, xi


def _buffer_bytes(sch, block) -> int:
    """Bytes of the (single) buffer a block writes."""
    reg = sch.get(block).writes[0]
    buf = getattr(reg, "buffer", None) or reg.source
    n = 1
    for d in buf.shape:
        n *= int(d)
    return n * tvm.runtime.DataType(buf.dtype).bits // 8


def schedule_dwconv(sch, block, lanes: int) -> None:
    """Per channel (the parallel tasks): the channel's padded input, then row by row a
    register tile of up to ``V`` vectors of the padded row, every tap unrolled (one load and
    one FMA per vector), and the fused epilogue on the row while it is in L1."""
    n, c, y, x, *red = sch.get_loops(block)
    owp = _extent(sch, x)
    crop = next(b for b in _all_blocks(sch) if sch.get(b).name_hint == "edgec_dwconv2d_crop")
    v = dw_vector(_extent(sch, sch.get_loops(crop)[-1]), lanes)
    small_map = _extent(sch, sch.get_loops(crop)[-2]) * _extent(sch, sch.get_loops(crop)[-1]) \
        <= 256  # output pixels per channel
    nv = owp // v
    xo, xv, xi = sch.split(x, [None, _pick_tile(nv, 8 if lanes >= 16 else 4), v])
    sch.reorder(n, c, y, xo, *red, xv, xi)
    epilogue = _fuse_epilogue(sch, block, y)
    nc = sch.fuse(n, c)
    sch.parallel(nc)
    # a channel's padded rows under 1 KiB stay on the stack; larger ones are a workspace
    # call per task, which costs more than a small map's convolution (14x14: 2 threads
    # ran 1.36x, not 2x, faster): then all channels are padded first, in parallel
    for pad in _find_blocks(sch, "edgec_pad"):
        loops = sch.get_loops(pad)
        per_channel = _buffer_bytes(sch, pad) // (_extent(sch, loops[0]) * _extent(sch, loops[1]))
        if per_channel >= 1024 and small_map:
            sch.parallel(sch.fuse(*loops[:2]))
        else:
            sch.compute_at(pad, nc, preserve_unit_loops=True)
    for r in red:
        sch.unroll(r)
    sch.unroll(xv)
    sch.vectorize(xi)
    sch.decompose_reduction(block, red[0])
    ow = _extent(sch, sch.get_loops(epilogue[-1])[-1]) if epilogue else 0
    ev = v if ow % v == 0 and ow > v else None  # (56 = 3 x 16 + 8: LLVM's split is better)
    for blk in epilogue:  # whole vectors along the row (LLVM splits a 112-lane vector badly)
        loops = sch.get_loops(blk)
        try:
            if ev is not None and _extent(sch, loops[-1]) == ow:
                _, inner = sch.split(loops[-1], [None, ev])
                sch.vectorize(inner)
            else:
                sch.vectorize(loops[-1])
        except Exception:  # noqa: BLE001 - a scalar epilogue is still correct
            pass


def schedule_matmul(sch, block, lanes: int) -> None:
    """C[.., i, j] += A[.., i, k] * B[.., k, j] with B's j contiguous: a register tile of
    ``ri`` rows x ``rj`` columns (vectors along j), k streamed, epilogue per tile."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if [iv.iter_type for iv in iters][-1] != 2 or len(loops) < 3:
        raise ValueError("not a matmul block")
    *batch, i, j, k = loops
    m_, n_ = _extent(sch, i), _extent(sch, j)
    rj = _pick_vec_tile(n_, lanes, 4 * lanes)
    ri = _pick_tile(m_, 4)
    io, ii = sch.split(i, [None, ri])
    jo, ji = sch.split(j, [None, rj])
    sch.reorder(*batch, io, jo, k, ii, ji)
    epilogue = _fuse_epilogue(sch, block, jo)
    outer = [*batch, io, jo]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.decompose_reduction(block, k)
    _vectorize_innermost(sch, epilogue)


def _pick_vec_tile(n: int, lanes: int, limit: int) -> int:
    """A column tile for vectors: the largest divisor of n that is a multiple of the vector
    width (or of 8, or of 4) and at most limit; else the largest divisor at most limit."""
    for unit in (lanes, 8, 4):
        for t in range(limit - limit % unit, 0, -unit):
            if n % t == 0:
                return t
    return _pick_tile(n, limit)


def schedule_generic(sch, lanes: int, min_parallel: int = 4096) -> bool:
    """Parallelize the outer spatial loops of every root block; vectorize a plain innermost
    spatial loop; reductions over trailing axes by :func:`_schedule_reduce`. Returns
    whether a reduction was scheduled."""
    reduced = False
    for blk in _all_blocks(sch):
        loops = sch.get_loops(blk)
        if not loops:
            continue
        iters = sch.get(blk).iter_vars
        kinds = [iv.iter_type for iv in iters]  # 0 = spatial, 2 = reduction
        n_sp = 0
        for k in kinds:
            if k != 0:
                break
            n_sp += 1
        if n_sp == 0 or len(loops) < n_sp:
            continue
        if n_sp < len(kinds) and _schedule_reduce(sch, blk, lanes, n_sp):
            reduced = True
            continue
        total = 1
        for lp in loops[:n_sp]:
            e = _extent(sch, lp)
            total *= e or 1
        if total < min_parallel:
            continue
        outer = loops[: max(1, n_sp - 1)] if n_sp > 1 else loops[:1]
        try:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        except Exception:  # noqa: BLE001
            continue
        if n_sp == len(loops) and n_sp > 1:
            inner = loops[-1]
            e = _extent(sch, inner)
            if e and e % lanes == 0:
                try:
                    _, vi = sch.split(inner, [None, lanes])
                    sch.vectorize(vi)
                except Exception:  # noqa: BLE001
                    pass
    return reduced


def _schedule_reduce(sch, block, lanes: int, n_sp: int) -> bool:
    """A sum/max over trailing contiguous axes (a global average pool, ``mean``):
    the reduction is split into ``U`` lanes (``rfactor``: ``U`` partial results per
    output, ``U`` up to four vectors, i.e. independent accumulator chains), vectorized
    along them, with the outputs in parallel; the partials are then combined per output.
    TOPI's loop is one scalar chain per output and, with few outputs, not parallel at all.
    Returns False (schedule untouched) when it does not apply."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters) or any(iv.iter_type != 2 for iv in iters[n_sp:]):
        return False
    red = loops[n_sp:]
    total = 1
    for lp in red:
        total *= _extent(sch, lp) or 0
    unit = next((u for u in (4 * lanes, 2 * lanes, lanes)
                 if total and total % u == 0 and total >= 2 * u), None)
    if unit is None:
        return False
    # the reduction must read the trailing axes of its input contiguously, in loop order
    reads = sch.get(block).reads
    rvars = [iv.var for iv in iters[n_sp:]]
    if not any(
            len(r.region) >= len(rvars) and all(
                rg.min.same_as(v) for rg, v in zip(list(r.region)[-len(rvars):], rvars))
            for r in reads):
        return False
    def steps(s_):
        lp = s_.get_loops(block)
        r = s_.fuse(*lp[n_sp:]) if len(lp) - n_sp > 1 else lp[n_sp]
        _, ri = s_.split(r, [None, unit])
        rf = s_.rfactor(ri, 0)  # raises for a reducer TIR does not recognize
        sp = s_.get_loops(rf)[:n_sp]
        s_.parallel(s_.fuse(*sp) if len(sp) > 1 else sp[0])
        s_.vectorize(s_.get_loops(rf)[-1])

    try:
        steps(sch.copy())  # on a copy first: a failure must not leave half a schedule
    except Exception:  # noqa: BLE001
        return False
    steps(sch)
    return True


PX_L1_BYTES = 16 * 1024  # a tile's input pixels (all input channels) stay in half of L1


def px_tile(lanes: int, budget: int, h: int, w: int, kbytes: int, oc: int):
    """How a pixels-in-lanes 1x1 kernel walks an ``h x w`` map: ``(hv, wv, wpad, vecs,
    rows)``, or None when no tile fits.

    When the ``h * w`` pixels fill whole vectors the map is one flat row (``hv = 1``,
    ``wv = h * w``; contiguous in NCHW) cut into tiles of ``vecs`` vectors, else each image
    row is padded to whole vectors (``wpad``) and is one tile. A tile is ``rows`` output
    channels x ``vecs`` vectors of 32-bit accumulators: at most ``budget`` and under 1 KiB
    (a larger per-task buffer is a workspace call per task instead of registers), and its
    input pixels (``kbytes`` per pixel: every input channel) within :data:`PX_L1_BYTES`, so
    the channel tiles that follow each other reuse them from L1. Among those, the most
    multiply-adds per load (``rows * vecs / (rows + vecs)``) times the share of the
    ``oc`` channels padded to whole tiles that is real."""
    limit = min(budget, 1023 // (4 * lanes))
    npix = h * w
    flat = npix % lanes == 0
    wpad = npix if flat else -(-w // lanes) * lanes
    nv = wpad // lanes
    best = None
    for vecs in range(1, min(limit, nv) + 1):
        if nv % vecs or (not flat and vecs != nv) or kbytes * vecs * lanes > PX_L1_BYTES:
            continue
        for rows in range(1, min(16, limit // vecs) + 1):
            score = (rows * vecs / (rows + vecs) * oc / (-(-oc // rows) * rows), rows * vecs)
            if best is None or score > best[0]:
                best = (score, vecs, rows)
    if best is None or (not flat and 4 * (wpad - w) > wpad):
        return None
    return (1, npix, wpad, best[1], best[2]) if flat else (h, w, wpad, best[1], best[2])


def schedule_px(sch, block, lanes: int, rd=None, inner=None, after=None,
                innermost=None) -> None:
    """Register tile of a pixels-in-lanes 1x1 convolution ``acc[n, o, y, x]`` (reduction
    ``rc`` over input channels, and for packed 8-bit words ``rd`` within a word): ``rows``
    output channels x ``vecs`` vectors of pixels (:func:`px_tile`; the kernel's
    ``PX_TILE`` annotation), channel tiles innermost
    so consecutive tasks reuse the same input pixels from L1 with other weights. The
    epilogue is computed per tile; on a flat view its (y, x) iteration is flattened to the
    kernel's pixel index first, so that it covers exactly the tile, whole vectors along the
    pixels. ``inner(xi)`` runs before the reduction's init is split off, ``after(xi)``
    after (tensorize)."""
    loops = sch.get_loops(block)
    n, o, y, x, rc = loops[:5]
    flat = _extent(sch, y) == 1
    vecs, rows = (int(v) for v in sch.get(block).annotations[PX_TILE])
    if _extent(sch, o) % rows or _extent(sch, x) % (vecs * lanes):
        raise ValueError("kernel computed for another tile")
    oo, oi = sch.split(o, [None, rows])
    xo, xv, xi = sch.split(x, [None, vecs, lanes])
    order = [n, y, xo, oo, rc, oi, xv]
    order += [xi, rd] if rd is not None else ([innermost, xi] if innermost is not None
                                              else [xi])
    sch.reorder(*order)

    def flatten(blk):  # (n, o, y, x) -> (n, o, y * W + x): the tile's pixels, contiguous
        iters = sch.get(blk).iter_vars
        if flat and len(iters) == 4 and int(iters[2].dom.extent) > 1:
            w = int(iters[3].dom.extent)
            sch.transform_block_layout(blk, lambda a, b, yy, xx: (a, b, yy * w + xx))

    epilogue = _fuse_epilogue(sch, block, oo, prepare=flatten)
    sch.parallel(sch.fuse(n, y, xo, oo))
    sch.unroll(oi)
    sch.unroll(xv)
    if inner is not None:
        inner(xi)
    sch.decompose_reduction(block, rc)
    if after is not None:
        after(xi)
    for blk in epilogue or []:  # (channel, pixel) loops: pixels in the vector lanes
        loops = sch.get_loops(blk)
        try:
            w = _extent(sch, loops[-1])
            if w % lanes == 0 and w > lanes:  # whole vectors (LLVM splits long ones badly)
                _, vi = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vi)
            else:
                sch.vectorize(loops[-1])
        except Exception:  # noqa: BLE001 - a scalar epilogue is still correct
            pass


def max_cols(lanes: int) -> int:
    """Output columns per conv register tile: with one accumulator vector per column, as many
    as the vector registers allow (32 zmm on AVX-512, 16 ymm on AVX2, 32 q on NEON)."""
    return 14 if lanes == 16 else 12 if lanes == 8 else 8


def schedule_func(func, lanes: int, isa=None):
    """Schedule one fused function; raise if no schedule applies cleanly."""
    sch = tvm.s_tir.Schedule(func)
    convs = _find_blocks(sch, CONV_BLOCK)
    dws = [b for b in _find_blocks(sch, DWCONV_BLOCK) if sch.get(b).name_hint == DWCONV_BLOCK]
    ints = [b for b in _find_blocks(sch, INT8_CONV_BLOCK)
            if sch.get(b).name_hint == INT8_CONV_BLOCK]
    pxs = [b for b in _find_blocks(sch, INT8_PX_BLOCK) if sch.get(b).name_hint == INT8_PX_BLOCK]
    fpx = [b for b in _find_blocks(sch, CONV_PX_BLOCK) if sch.get(b).name_hint == CONV_PX_BLOCK]
    wino = _find_blocks(sch, WINO_GEMM_BLOCK)
    wino8 = _find_blocks(sch, WINO8_GEMM_BLOCK)
    if len(convs) + len(dws) + len(ints) + len(pxs) + len(fpx) + len(wino) + len(wino8) > 1:
        raise ValueError("more than one convolution in a fused function")
    mms = [b for b in _all_blocks(sch) if sch.get(b).name_hint in ("matmul", "T_matmul_NN",
                                                                      "T_matmul")]
    if pxs or ints or wino8:
        from .cpu_int8 import ISA_ATTR, ISAS, schedule_int8_conv, schedule_int8_px

        block = (pxs or ints or wino8)[0]
        built_for = sch.get(block).annotations.get(ISA_ATTR)  # the kernel's own form
        isa = ISAS[str(built_for)] if built_for is not None else isa
        if isa is None:
            raise ValueError("an int8 convolution needs the target's integer ISA")
        if wino8:
            from .cpu_int8_winograd import schedule_int8_winograd

            schedule_int8_winograd(sch, block, isa, max_cols(lanes))
            kind = "conv2d-int8wino-" + isa.name
        elif pxs:
            schedule_int8_px(sch, block, isa)
            kind = "conv2d-int8px-" + isa.name
        else:
            schedule_int8_conv(sch, block, isa, max_cols(lanes))
            kind = "conv2d-int8-" + isa.name
    elif wino:
        m = _extent(sch, sch.get_loops(_find_blocks(sch, WINO_OUT1_BLOCK)[0])[3])
        schedule_winograd(sch, wino[0], max_cols(lanes))
        kind = f"conv2d-winograd-f{m}"
    elif fpx:
        schedule_px(sch, fpx[0], lanes, inner=sch.vectorize)
        _parallel_pad(sch)
        kind = "conv2d-px"
    elif convs:
        schedule_conv(sch, convs[0], lanes, max_cols(lanes))
        kind = "conv2d-packed"
    elif dws:
        pool = isinstance(getattr(sch.get(dws[0]).body, "value", None), tvm.tirx.Max)
        schedule_dwconv(sch, dws[0], lanes)
        kind = "maxpool2d" if pool else "dwconv2d"
    elif len(mms) == 1:
        schedule_matmul(sch, mms[0], lanes)
        kind = "matmul"
    else:
        kind = "reduce" if schedule_generic(sch, lanes) else "generic"
    return sch.mod["main"], kind


def schedule_pass(target, record: dict | None = None):
    """Module pass: schedule every PrimFunc. ``record`` (if given) receives, per function,
    the kernel used, and for those left with default loops, the reason."""
    from .cpu_int8 import select_isa

    lanes = simd_floats(target)
    isa = select_isa(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCPUSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue  # a tuned schedule was applied
            try:
                updates[gv], kind = schedule_func(
                    func.with_attr("global_symbol", gv.name_hint), lanes, isa)
                if record is not None:
                    record.setdefault("kernels", {})[gv.name_hint] = kind
            except Exception as e:  # noqa: BLE001 - keep the correct default loops
                msg = str(e).strip().splitlines()
                log.debug("no schedule for %s: %s", gv.name_hint, e)
                if record is not None:
                    record.setdefault("unscheduled", {})[gv.name_hint] = \
                        (msg[-1] if msg else type(e).__name__)[:200]
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass
