"""Fused 1x1 expansion + depthwise convolution (float): the expanded map never leaves the
core's caches.

MobileNet-style blocks widen a thin map by a 1x1 convolution (16 -> 96 channels at
112 x 112: a 4.8 MB map), clamp it, and run a depthwise convolution over it. As two kernels
the expanded map is written to memory by the first and read back by the second; on a
2-core host with 2 MiB of L2 per core the depthwise kernel then ran 1.3-1.5x slower inside
the model than alone (MobileNetV2's features.2: 0.16 ms alone, 0.20-0.24 ms after its
expansion). Here one task computes a band of ``B`` output rows of a block of channels::

    Xs_p[k, r, j]  = X[k, y0 - pt + r, j * s + p - pl]           (0 outside; phases p < s)
    E_p[c, r, j]   = act1(sum_k W1[c, k] * Xs_p[k, r, j] + b1[c])   (0 where Xs_p is padding)
    Y[c, y, x]     = act2(sum_{i,k} E_{k % s}[c, (y - y0/s) * s + i, x + k // s] * W2[c, i, k]
                          + b2[c])

``r`` runs over the ``R = (B - 1) * s + kh`` input rows the band's output rows read, ``j``
over the columns of the column phase ``p`` (stride ``s``: each tap then reads contiguous
columns, as :func:`..compute.column_phases`). ``Xs`` is filled once per task, ``E`` once
per block of ``CB`` channels into a buffer of ``P x CB x R x COLS`` floats (tens of KiB, in
L1/L2) and read there by the depthwise taps; the ``kh - s`` rows two bands share are
computed by both (the price of independent tasks). The expansion is pixels-in-lanes over
the flattened ``R x COLS`` phase rows (``ER`` channels x ``EV`` vectors in registers, as
:mod:`.pixel_conv`), the depthwise part the row kernel's (:mod:`.row_conv`: one output row
of whole vectors, taps unrolled).

MobileNetV2's 16 -> 96 at 112 x 112 then 3x3/2, alone (AVX-512, 2 threads): 0.40 ms as two
kernels, 0.25-0.27 ms fused (onnxruntime 0.46). Over smaller maps the recomputed rows and
the phase copies cost more than the round trip saves (24 -> 144 at 56 x 56 3x3/1: 0.18 ms
as two kernels, 0.19-0.23 fused): :mod:`..rewrites.expand_dw` fuses large maps only.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from ..compute import conv_out, fast_sigmoid
from .row_conv import dw_vector
from .sparse import KERNEL_ATTR, MACS_ATTR, clamp_epilogue

KERNEL = "expand-dwconv2d"  # the kernel's name in the build report


@dataclass(frozen=True)
class Plan:
    """How one fused layer is cut: ``band`` output rows x ``cb`` channels per step,
    ``er`` x ``ev`` the expansion's register tile, ``groups`` channel groups (tasks are
    bands x groups)."""

    band: int
    cb: int
    er: int
    ev: int
    groups: int


def plan_for(c: int, oh: int, s: int, cores: int) -> Plan:
    """Bands of 4 output rows at stride 2 (9 input rows for 8: an eighth of the expansion
    recomputed), 8 at stride 1; blocks of 16 channels (at 112 x 112 / 2 the expanded
    buffer is 2 x 16 x 9 x 57 floats, 64 KiB); a 4 x 4 register tile (4 x 3, 3 x 4, 4 x 6,
    8 x 3, 6 x 4, 2 x 8 measured 1.0-1.4x its time there); the fewest channel groups that
    give every core 4 tasks."""
    band = min(4 if s == 2 else 8, oh)
    cb = next(d for d in (16, 12, 8, 6, 4, 3, 2, 1) if c % d == 0)
    er = next(d for d in (4, 3, 2, 1) if cb % d == 0)
    bands = -(-oh // band)
    blocks = c // cb
    groups = next((g for g in range(1, blocks + 1)
                   if blocks % g == 0 and bands * g >= 4 * cores), blocks)
    return Plan(band, cb, er, 4, groups)


def epilogue(lo=None, hi=None, silu: bool = False):
    """The activation after a convolution's bias: ``clamp(v, lo, hi)`` (ReLU, ReLU6; NaN
    kept, :func:`.sparse.clamp_epilogue`), or SiLU ``v * sigmoid(v)`` (EfficientNet's),
    NaN kept."""
    if not silu:
        return clamp_epilogue(lo, hi)

    def f(v):
        return T.Select(tvm.tirx.isnan(v), v, v * fast_sigmoid(v))
    return f


@dataclass(frozen=True)
class Geometry:
    """The fused kernel's sizes (capitals as in the module docstring)."""

    N: int
    Cin: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    s: int
    pads: tuple
    OH: int
    OW: int
    L: int          # lanes of the expansion's vectors
    V: int          # lanes of the depthwise rows' vectors (:func:`.row_conv.dw_vector`)
    NVO: int        # vectors of a padded output row
    XT: int         # of them per register tile
    COLS: int       # columns of a phase row
    R: int          # input rows of a band
    NV: int         # vectors of a phase buffer (NPIX and what padded outputs read)
    NB: int         # bands
    plan: Plan

    @property
    def NPIX(self) -> int:  # noqa: N802 - the docstring's name
        return self.R * self.COLS

    @property
    def flat(self) -> int:
        return self.NV * self.L

    @property
    def CPG(self) -> int:  # noqa: N802 - channels per task
        return self.C // self.plan.groups

    @property
    def NCB(self) -> int:  # noqa: N802 - channel blocks per task
        return self.CPG // self.plan.cb


def geometry(x_shape, c: int, kh: int, kw: int, s: int, pads, lanes: int,
             plan: Plan) -> Geometry:
    n, cin, h, w = (int(d) for d in x_shape)
    pt, pl, pb, pr = (int(p) for p in pads)
    oh, ow = conv_out(h, pt, pb, kh, s, 1), conv_out(w, pl, pr, kw, s, 1)
    v = dw_vector(ow, lanes)
    nvo = -(-ow // v)
    xt = next(d for d in range(min(8, nvo), 0, -1) if nvo % d == 0)
    # the columns of a phase row that real outputs read; the padded outputs past OW read
    # on into the next row (their sums are never stored), the last row's into the tail
    cols = ow + (kw - 1) // s
    r = (plan.band - 1) * s + kh
    nv = -(-max(r * cols, (r - 1) * cols + nvo * v + (kw - 1) // s) // lanes)
    return Geometry(n, cin, c, h, w, kh, kw, s, (pt, pl, pb, pr), oh, ow, lanes, v, nvo, xt,
                    cols, r, nv, -(-oh // plan.band), plan)


def _fill_macro(g: Geometry):
    """The band's input rows split by column phase into ``xs[P, Cin, flat]`` (zeros outside
    the image). Stride 2: even input columns ``2m`` go to phase ``PE`` at column
    ``m + OE``, odd ones to ``PO`` at ``m + OO``; ``NQ`` chunks of ``L`` pairs whose columns
    lie in the phase rows are split by two shuffles, the columns before and after them are
    read one by one."""
    s, L, COLS, W, H = g.s, g.L, g.COLS, g.W, g.H
    pt, pl = g.pads[0], g.pads[1]
    PE, PO, OE, OO = pl % 2, (pl + 1) % 2, pl // 2, (pl + 1) // 2
    NQ = max(0, min(W // (2 * L), (COLS - OO) // L)) if s == 2 else 0
    EVEN, ODD = [2 * i for i in range(L)], [2 * i + 1 for i in range(L)]

    def tap(x, n, k, row, j, p):  # column j of phase p in image row ``row`` (0 outside)
        col = j * s + p - pl
        return T.if_then_else(tvm.tirx.all(col >= 0, col < W),
                              x[n, k, row, T.max(T.min(col, W - 1), 0)], T.float32(0))

    @T.macro
    def fill(x, xs, n, band):
        for k, r in T.grid(g.Cin, g.R):
            row = band * g.plan.band * s - pt + r
            if row >= 0 and row < H:
                if s == 2:
                    for q in range(NQ):
                        xs[PE, k, T.ramp(r * COLS + q * L + OE, 1, L)] = T.Shuffle(
                            [x[n, k, row, T.ramp(2 * q * L, 1, L)],
                             x[n, k, row, T.ramp(2 * q * L + L, 1, L)]], EVEN)
                        xs[PO, k, T.ramp(r * COLS + q * L + OO, 1, L)] = T.Shuffle(
                            [x[n, k, row, T.ramp(2 * q * L, 1, L)],
                             x[n, k, row, T.ramp(2 * q * L + L, 1, L)]], ODD)
                    for j in range(OE):
                        xs[PE, k, r * COLS + j] = tap(x, n, k, row, j, PE)
                    for j in range(COLS - NQ * L - OE):
                        xs[PE, k, r * COLS + NQ * L + OE + j] = tap(
                            x, n, k, row, NQ * L + OE + j, PE)
                    for j in range(OO):
                        xs[PO, k, r * COLS + j] = tap(x, n, k, row, j, PO)
                    for j in range(COLS - NQ * L - OO):
                        xs[PO, k, r * COLS + NQ * L + OO + j] = tap(
                            x, n, k, row, NQ * L + OO + j, PO)
                else:  # one phase: the row copied between its zero columns
                    for j in range(pl):
                        xs[0, k, r * COLS + j] = T.float32(0)
                    for j in T.vectorized(W):
                        xs[0, k, r * COLS + pl + j] = x[n, k, row, j]
                    for j in range(COLS - pl - W):
                        xs[0, k, r * COLS + pl + W + j] = T.float32(0)
            else:
                for p in range(s):
                    for j in T.vectorized(COLS):
                        xs[p, k, r * COLS + j] = T.float32(0)
        for p, k in T.grid(s, g.Cin):
            for j in range(g.flat - g.NPIX):  # (under a vector: maybe none)
                xs[p, k, g.NPIX + j] = T.float32(0)

    return fill


def _expand_macro(g: Geometry, act, apart: bool = False):
    """``es[p, ci] = act(w1[c0 + ci] . xs[p] + b1[c0 + ci])`` over the flattened phase rows,
    pixels in the lanes: ``ER`` channels x ``EV`` vectors per register tile (then single
    vectors), the accumulators starting from the bias; then the depthwise convolution's
    zero padding (the expansion of a zero is ``act(b1)``, not 0). ``apart``: the activation
    in a pass of its own over the block (SiLU: its polynomial's constants and temporaries
    beside 16 live accumulators spilled, 3x its cost in the two-kernel form)."""
    L, ER, EV, s, COLS = g.L, g.plan.er, g.plan.ev, g.s, g.COLS
    in_tile = (lambda v: v) if apart else act
    pt, pl = g.pads[0], g.pads[1]
    NVT = g.NV // EV

    def first(p):  # the first column j of phase p whose image column j*s + p - pl is >= 0
        return T.max(0, (pl - p + s - 1) // s)

    def last(p):  # one past the last column j of phase p inside the image
        return T.min(COLS, (g.W + pl - p + s - 1) // s)

    @T.macro
    def tile(xs, es, w1, b1, c0, p, co, j0, nvec):
        acc = T.alloc_buffer((ER, nvec * L), "float32", scope="local")
        for e in T.unroll(ER):
            for v in T.unroll(nvec):
                for l in T.vectorized(L):
                    acc[e, v * L + l] = b1[c0 + co * ER + e]
        for k in range(g.Cin):
            for e in T.unroll(ER):
                for v in T.unroll(nvec):
                    for l in T.vectorized(L):
                        acc[e, v * L + l] = acc[e, v * L + l] + w1[c0 + co * ER + e, k] * \
                            xs[p, k, (j0 + v) * L + l]
        for e in T.unroll(ER):
            for v in T.unroll(nvec):
                for l in T.vectorized(L):
                    es[p, co * ER + e, (j0 + v) * L + l] = in_tile(acc[e, v * L + l])

    @T.macro
    def expand(xs, es, w1, b1, c0, band):
        for p, co, jo in T.grid(s, g.plan.cb // ER, NVT):
            tile(xs, es, w1, b1, c0, p, co, jo * EV, EV)
        for p, co, jr in T.grid(s, g.plan.cb // ER, g.NV - NVT * EV):
            tile(xs, es, w1, b1, c0, p, co, NVT * EV + jr, 1)
        if apart:
            for p, ci, j in T.grid(s, g.plan.cb, g.NV):
                for l in T.vectorized(L):
                    es[p, ci, j * L + l] = act(es[p, ci, j * L + l])
        for p, ci, r in T.grid(s, g.plan.cb, g.R):
            row = band * g.plan.band * s - pt + r
            if row < 0 or row >= g.H:
                for j in T.vectorized(COLS):
                    es[p, ci, r * COLS + j] = T.float32(0)
            else:
                for j in range(first(p)):
                    es[p, ci, r * COLS + j] = T.float32(0)
                for j in range(COLS - last(p)):
                    es[p, ci, r * COLS + last(p) + j] = T.float32(0)

    return expand


def _depthwise_macro(g: Geometry, act):
    """One output row of ``XT`` vectors at a time, the taps unrolled, each reading its
    phase's contiguous columns in ``es``; the accumulators start from the bias; the
    activation on whole vectors, then whole vectors stored as vectors (a test per lane would
    scalarize them all), the last partial one lane by lane, the columns past ``OW`` not at
    all."""
    V, XT, s, COLS, B = g.V, g.XT, g.s, g.COLS, g.plan.band

    @T.macro
    def depthwise(es, w2, b2, y, c0, n, band):
        for ci, yl, xo in T.grid(g.plan.cb, B, g.NVO // XT):
            if band * B + yl < g.OH:
                dacc = T.alloc_buffer((XT * V,), "float32", scope="local")
                for v in T.unroll(XT):
                    for l in T.vectorized(V):
                        dacc[v * V + l] = b2[c0 + ci]
                for i in T.unroll(g.kh):
                    for kx in T.unroll(g.kw):
                        for v in T.unroll(XT):
                            for l in T.vectorized(V):
                                dacc[v * V + l] = dacc[v * V + l] + es[
                                    kx % s, ci, (yl * s + i) * COLS + xo * XT * V
                                    + v * V + kx // s + l] * w2[c0 + ci, i, kx]
                for v in T.unroll(XT):
                    for l in T.vectorized(V):
                        dacc[v * V + l] = act(dacc[v * V + l])
                    if xo * XT + v < g.OW // V:  # a whole vector (a test per vector, not lane)
                        for l in T.vectorized(V):
                            y[n, c0 + ci, band * B + yl, (xo * XT + v) * V + l] = \
                                dacc[v * V + l]
                    else:
                        for l in range(V):
                            if (xo * XT + v) * V + l < g.OW:
                                y[n, c0 + ci, band * B + yl, (xo * XT + v) * V + l] = \
                                    dacc[v * V + l]

    return depthwise


def expand_dw_func(x_shape, c: int, kh: int, kw: int, s: int, pads, lanes: int, plan: Plan,
                   act1=(None, None, False), act2=(None, None, False)):
    """The fused kernel; arguments ``(x, w1[C, Cin], b1[C], w2[C, kh, kw], b2[C], y)``.
    ``act1`` / ``act2``: the :func:`epilogue` ``(lo, hi, silu)`` after the expansion's /
    the depthwise convolution's bias. Tasks: images x bands x channel groups; each
    allocates its phase buffers ``xs`` / ``es`` (tens of KiB) once."""
    g = geometry(x_shape, c, kh, kw, s, pads, lanes, plan)
    fill = _fill_macro(g)
    expand = _expand_macro(g, epilogue(*act1), apart=act1[2])
    depthwise = _depthwise_macro(g, epilogue(*act2))
    N, Cin, H, W, OH, OW, G = g.N, g.Cin, g.H, g.W, g.OH, g.OW, plan.groups
    f32 = "float32"

    @T.prim_func(private=True)
    def fused(x: T.Buffer((N, Cin, H, W), f32), w1: T.Buffer((c, Cin), f32),
              b1: T.Buffer((c,), f32), w2: T.Buffer((c, kh, kw), f32),
              b2: T.Buffer((c,), f32), y: T.Buffer((N, c, OH, OW), f32)):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(N * g.NB * G):
            xs = T.alloc_buffer((s, Cin, g.flat), f32)
            es = T.alloc_buffer((s, plan.cb, g.flat), f32)
            n = task // (g.NB * G)
            band = task // G % g.NB
            fill(x, xs, n, band)
            for cb in range(g.NCB):
                expand(xs, es, w1, b1, task % G * g.CPG + cb * plan.cb, band)
                depthwise(es, w2, b2, y, task % G * g.CPG + cb * plan.cb, n, band)

    macs = N * c * (H * W * Cin + OH * OW * kh * kw)  # the two layers' (not recomputed)
    return fused.with_attr(KERNEL_ATTR, KERNEL).with_attr(MACS_ATTR, int(macs))
