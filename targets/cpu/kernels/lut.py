"""Reuse-lookup matmul for weights that take few distinct values (float32, x86).

A Gemm / MatMul weight ``W[O x K]`` (outputs x inputs) whose values are a codebook of
``Kc <= 16`` values (``cluster``'s output: ``W[o, k] = c[idx[o, k]]``) is computed without a
multiply per weight. Per batch row:

1. per group of ``g`` inputs (``Kc ** g <= 16``: ``g = 4`` for 2 values, 2 for 3-4, 1 for
   5-16) a table of the 16 sums ``T[j, e] = sum_i c[digit_i(e)] * x[j*g + i]``: one vector
   of 16 entries and ``g`` vector multiply-adds per group (``16 * g`` multiplies per ``g``
   inputs, shared by every output: 1.6 % of a 1024 x 1024 layer's);
2. each output adds one table entry per group: ``y[o] = sum_j T[j, e(o, j)]``, with
   ``e(o, j)`` the ``g`` weight indices of the group as one 4-bit number. The 16-entry
   table sits in one vector register and 16 outputs look their entries up at once with one
   in-register permute -- ``vpermps`` zmm on AVX-512, two ``vpermps`` ymm and a blend on
   AVX2 -- then add: ``g`` weights per lookup, no multiply.

The output tiles are split into as many parallel chunks as the target has cores, each
building the tables of its rows itself: a table another core wrote is read line by line from
that core's cache (1024 x 1024 with 4 values: 17.6 us on 2 cores with one shared table, 8.5
with one per chunk; 1 core: 16.4).

The indices are stored as nibbles, two groups per byte, in the order the kernel reads them
(``[output tile, group pair, outputs of the tile]``): ``Kc <= 4`` takes 2 bits per weight
in the library (``g = 2``), 1 bit with 2 values, against 32 (fp32) or 8 (int8). This is
T-MAC's idea (EuroSys 2025: table lookups instead of multiplies for low-bit weights) with
float tables and a codebook instead of bit planes, so any ``Kc <= 16`` values work, not
only uniform levels. aarch64 (NEON ``tbl`` works on bytes) has no form yet: there the
layer stays on the dense kernel and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

from .sparse import KERNEL_ATTR, MACS_ATTR, clamp_epilogue

MAX_VALUES = 16
MAX_ROWS = 4        # batch rows: each row builds its own tables; past this the dense kernel
MIN_SAVING = 4      # the tables' multiplies must be this many times fewer than dense
# An 8-lane lookup (AVX2: two vpermps and a blend) or a 16-lane one (AVX-512: one vpermps)
# of fewer than 4 weights does not beat one FMA per 8 or 16 weights of the dense kernel
# while the dense kernel's float32 weights (O x K x 4 bytes) stay in the cores' L2; past
# DENSE_BYTES[lanes][g] they stream from further out and the lookup kernel wins. Batch 1,
# 2 cores (2 MiB L2 each), lookup / dense time (one run each; 2026-12-04, tables per chunk):
#   values (g)         512^2  768^2  1024^2  1280^2  (1, 2.25, 4, 6.25 MiB)
#   AVX2    4 (2)       1.44   1.52   0.78    0.44
#   AVX2   16 (1)       2.60   2.79   1.59    0.81
#   AVX-512 4 (2)       0.81    -     0.27     -
#   AVX-512 16 (1)      1.20   1.12   0.52     -
# With 2 values (4 inputs per lookup) the lookup kernel always wins. A smaller L2 (a real
# Haswell has 256 KiB) moves the break-even down: these limits keep the dense kernel there.
DENSE_BYTES = {8: {1: 5 << 20, 2: 3 << 20}, 16: {1: 3 << 20}}  # by lanes, then g
VO = 4              # output vectors per task (independent accumulator chains)


@dataclass(frozen=True)
class Codebook:
    """``W[O x K]`` as ``values[idx]``; ``packed``: the kernel's nibble layout."""

    values: np.ndarray   # float32 [16] (the Kc values, then zeros)
    coef: np.ndarray     # float32 [g, 16]: coef[i, e] = values[digit i of e] (table rows)
    count: int           # Kc
    group: int           # g: inputs per lookup
    packed: np.ndarray   # uint8 [tiles, group pairs, lanes * VO]
    rows: int            # O
    inputs: int          # K

    @property
    def nbytes(self) -> int:
        return self.coef.nbytes + self.packed.nbytes


def group_size(count: int) -> int:
    """Inputs per lookup: the most ``g`` (at most 4) with ``count ** g <= 16``."""
    g = 1
    while g < 4 and max(count, 2) ** (g + 1) <= MAX_VALUES:
        g += 1
    return g


def codebook(w2d: np.ndarray, lanes: int) -> Codebook | None:
    """The codebook form of ``w2d`` (outputs x inputs), or None with more than 16 distinct
    values."""
    values, idx = np.unique(w2d, return_inverse=True)
    if len(values) > MAX_VALUES or len(values) < 1:
        return None
    idx = idx.reshape(w2d.shape)
    o, k = w2d.shape
    kc = len(values)
    g = group_size(kc)
    groups = -(-k // g)
    pairs = -(-groups // 2)
    tile = lanes * VO
    tiles = -(-o // tile)
    code = np.zeros((2 * pairs, tiles * tile), np.int64)  # [group, output]
    for i in range(g):
        cols = np.arange(groups) * g + i
        ok = cols < k
        code[:groups][ok, :o] += idx[:, cols[ok]].T * kc ** i
    packed = (code[0::2] | (code[1::2] << 4)).astype(np.uint8)          # [pairs, outputs]
    packed = np.ascontiguousarray(packed.reshape(pairs, tiles, tile).transpose(1, 0, 2))
    vals = np.zeros(MAX_VALUES, np.float32)
    vals[:kc] = values
    e = np.arange(16)
    coef = np.stack([np.where(e < kc ** g, vals[(e // kc ** i) % kc], 0.0)
                     for i in range(g)]).astype(np.float32)
    return Codebook(vals, coef, kc, g, packed, o, k)


def lut_func(x_shape, y_shape, cb: Codebook, lanes: int, lo: float | None = None,
             hi: float | None = None, cores: int = 1):
    """``y = clamp(x @ W^T + bias)`` for ``x`` (``x_shape``, seen as ``[rows, K]``) and the
    codebook weight; arguments ``(x, coef[g, 16], packed, bias[tiles * lanes * VO], y)``.
    ``cores``: the parallel chunks of output tiles (module docstring)."""
    if lanes not in (8, 16):
        raise ValueError("the lookup kernel needs AVX2 or AVX-512")
    K, O, Kc, g = cb.inputs, cb.rows, cb.count, cb.group
    R = int(np.prod(x_shape[:-1]))
    NT, G2, W = cb.packed.shape
    G = 2 * G2
    L = lanes
    CH = next(c for c in range(max(1, min(int(cores), R * NT)), 0, -1) if R * NT % c == 0)
    TPC = R * NT // CH                      # tiles per chunk (CH: a divisor, the chunks)
    x_shape, y_shape = tuple(int(d) for d in x_shape), tuple(int(d) for d in y_shape)
    epi = clamp_epilogue(lo, hi)
    f32 = "float32"

    def column(coef, x, r, j, i):
        """Input ``j * g + i`` of row ``r`` (0 past the last input)."""
        kk = j * g + i
        if G * g <= K:
            return x[r, kk]
        return T.if_then_else(kk < K, x[r, T.min(kk, K - 1)], T.float32(0))

    if L == 16:
        def lookup(table, r, j, w):
            return T.call_llvm_pure_intrin(
                "float32x16", "llvm.x86.avx512.permvar.sf.512",
                table[r, j, T.ramp(0, 1, 16)], w)
    else:
        def lookup(table, r, j, w):
            lo8 = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps",
                                          table[r, j, T.ramp(0, 1, 8)], w)
            hi8 = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps",
                                          table[r, j, T.ramp(8, 1, 8)], w)
            high = T.bitwise_and(w, T.Broadcast(T.int32(8), 8)) != T.Broadcast(T.int32(0), 8)
            return T.Select(high, hi8, lo8)

    vec = f"int32x{L}"

    @T.prim_func(private=True)
    def lut(x_: T.Buffer(x_shape, f32), coef: T.Buffer((g, 16), f32),
            idx: T.Buffer((NT, G2, W), "uint8"), bias: T.Buffer((NT * W,), f32),
            y_: T.Buffer(y_shape, f32)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((R, K), f32, data=x_.data)
        y = T.decl_buffer((R, O), f32, data=y_.data)
        for ch in T.parallel(CH):  # per chunk its own tables (see the docstring)
            table = T.alloc_buffer((R, G, 16), f32)
            for r in range(ch * TPC // NT, ((ch + 1) * TPC - 1) // NT + 1):  # the chunk's rows
                for j in range(G):  # one vector of 16 entries per group: g multiply-adds
                    for e in T.vectorized(16):
                        table[r, j, e] = T.float32(0)
                    for i in T.unroll(g):
                        for e in T.vectorized(16):
                            table[r, j, e] = table[r, j, e] + coef[i, e] * column(coef, x, r, j, i)
            for tt in range(TPC):
                acc = T.alloc_buffer((VO, L), f32, scope="local")
                t = ch * TPC + tt
                r = t // NT
                for v in T.unroll(VO):
                    for lane in T.vectorized(L):
                        acc[v, lane] = bias[t % NT * W + v * L + lane]
                for j2 in range(G2):
                    for v in T.unroll(VO):
                        w = T.Cast(vec, idx[t % NT, j2, T.ramp(v * L, 1, L)])
                        acc[v, T.ramp(0, 1, L)] = acc[v, T.ramp(0, 1, L)] + \
                            lookup(table, r, 2 * j2, w) + \
                            lookup(table, r, 2 * j2 + 1,
                                   T.shift_right(w, T.Broadcast(T.int32(4), L)))
                for v in T.unroll(VO):
                    for lane in T.vectorized(L):
                        if t % NT * W + v * L + lane < O:
                            y[r, t % NT * W + v * L + lane] = epi(acc[v, lane])

    return lut.with_attr(KERNEL_ATTR, f"lookup({Kc} values, {g} per lookup)").with_attr(
        MACS_ATTR, int(R * G * g * 16))


def dense_limit(cb: Codebook, lanes: int) -> int:
    """Dense float32 weight bytes up to which the dense kernel is faster (:data:`DENSE_BYTES`;
    0: the lookup kernel always pays)."""
    return DENSE_BYTES.get(lanes, {}).get(cb.group, 0)


def pays(cb: Codebook, lanes: int) -> bool:
    """Whether the lookup kernel beats the dense one for this weight at ``lanes``."""
    return 4 * cb.rows * cb.inputs > dense_limit(cb, lanes)


def multiplies(rows: int, cb: Codebook) -> tuple[int, int]:
    """``(multiplies of the dense layer, multiplies the lookup kernel executes)``: the
    tables' ``16 * g`` per group of ``g`` inputs, nothing per weight."""
    groups = -(-cb.inputs // cb.group)
    return rows * cb.rows * cb.inputs, rows * groups * cb.group * 16
