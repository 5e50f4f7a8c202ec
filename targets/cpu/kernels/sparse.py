"""Sparse x dense kernels for weights with many zeros (float32): compressed weights, one
broadcast multiply-add per nonzero.

A layer's constant weight, as a matrix ``W[O x K]`` (output channels x taps), is stored as
blocks of ``B`` consecutive output channels that share the positions of their nonzeros
(``B = 1``: unstructured): ``vals[nnzb, B]`` (the values, per block row in order),
``offs[nnzb]`` (int32: where the tap's input lies, in elements) and ``ptr[O / B + 1]``
(each block's first nonzero): compressed sparse rows (CSR) of blocks -- the library holds
``nnz * 4 + nnzb * 4`` bytes instead of ``O * K * 4``.

:func:`spmm_func` (convolutions; XNNPACK's scheme for sparse MobileNets): output pixels
in the vector lanes, ``Y[o, p] = sum_k W[o, k] * X[k, p]``. A task owns a tile of ``M``
pixels and a chunk of output blocks; per block, ``B x M`` accumulators start at the bias,
every nonzero of the block loads one vector tile of input pixels at ``offs[k] + p`` and
adds ``vals[k, r]`` (broadcast) times it into each of the ``B`` rows; the epilogue (a
NaN-keeping clamp: ReLU, ReLU6) is applied on the way out. A ``kh x kw`` convolution of
stride 1 is the same kernel on the padded input flattened per image: tap ``(c, ky, kx)``
is the offset ``c * Hp * Wp + ky * dh * Wp + kx * dw`` and the ``Hout x Wp`` output
positions are computed as one row (the ``Wp - Wout`` columns past the right edge are
discarded by the caller), so no im2col copy is made.

:func:`spmv_func` (Gemm / MatMul, rows of the batch): per row and output block, the
nonzeros' input elements are gathered (``x[offs[k]]``) and multiplied by the block's ``B``
values in one vector; unstructured rows (``B = 1``) are padded to groups of ``G`` nonzeros
(zero values) that are gathered and multiplied ``G`` at a time, then summed.

Which layers take them is decided by :func:`choose` from the break-even densities measured
per ISA and shape class (``sparse_breakeven.json``, written by
``benchmarks/sparse_bench.py --calibrate``): a layer denser than its class's break-even
keeps the dense kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tvm.script import tirx as T

BREAKEVEN_FILE = Path(__file__).with_name("sparse_breakeven.json")
KERNEL_ATTR = "edgec_kernel"   # PrimFunc attribute: the kernel's name (hand-scheduled)
MACS_ATTR = "edgec_macs"       # PrimFunc attribute: multiply-adds one call executes
GATHER = 8                     # unstructured Gemm rows: nonzeros gathered per vector step


# ------------------------------------------------------------------------------ the weights
@dataclass(frozen=True)
class Compressed:
    """A weight matrix in blocked CSR form (see the module docstring)."""

    vals: np.ndarray   # float32 [nnzb * B] (or [groups * G] for padded unstructured rows)
    offs: np.ndarray   # int32 [nnzb]        (or [groups * G])
    ptr: np.ndarray    # int32 [O / B + 1]   (in groups for padded rows)
    block: int
    rows: int          # O
    nnz: int           # nonzero weights (elements, blocks' zeros included)

    @property
    def nbytes(self) -> int:
        return self.vals.nbytes + self.offs.nbytes + self.ptr.nbytes


def block_size(w2d: np.ndarray, candidates=(16, 8, 4, 2)) -> int:
    """The largest ``B`` among ``candidates`` for which every aligned block of ``B``
    consecutive rows of ``w2d`` has one nonzero pattern (1: unstructured)."""
    nz = w2d != 0
    o = nz.shape[0]
    for b in candidates:
        if b > o:
            continue
        nb = -(-o // b)
        pad = np.zeros((nb * b, nz.shape[1]), bool)
        pad[:o] = nz
        pad = pad.reshape(nb, b, -1)
        full = pad[: o // b]
        if (full == full[:, :1]).all() and (o % b == 0 or
                                            (pad[-1, : o % b] == pad[-1, :1]).all()):
            return b
    return 1


def compress(w2d: np.ndarray, block: int, offsets: np.ndarray) -> Compressed:
    """``w2d[O x K]`` in blocks of ``block`` rows; ``offsets[K]``: where tap ``k`` reads its
    input (elements). Rows past ``O`` (the last block's padding) are zero."""
    o, k = w2d.shape
    nb = -(-o // block)
    wp = np.zeros((nb * block, k), np.float32)
    wp[:o] = w2d
    blk = wp.reshape(nb, block, k)
    nz = (blk != 0).any(axis=1)                      # [nb, K]: the block's taps
    ptr = np.concatenate([[0], np.cumsum(nz.sum(1))]).astype(np.int32)
    bi, ki = np.nonzero(nz)
    vals = np.ascontiguousarray(blk[bi, :, ki], np.float32).reshape(-1)
    return Compressed(vals, np.ascontiguousarray(offsets[ki], np.int32), ptr, block, o,
                      int((w2d != 0).sum()))


def compress_gather(w2d: np.ndarray, group: int = GATHER) -> Compressed:
    """Unstructured rows for :func:`spmv_func`: each row's nonzeros padded with zeros to a
    multiple of ``group``; ``ptr`` counts groups."""
    o, k = w2d.shape
    vals, offs, ptr = [], [], [0]
    for r in range(o):
        (idx,) = np.nonzero(w2d[r])
        pad = -len(idx) % group
        vals.append(np.concatenate([w2d[r, idx], np.zeros(pad, np.float32)]))
        offs.append(np.concatenate([idx, np.zeros(pad, np.int64)]))
        ptr.append(ptr[-1] + (len(idx) + pad) // group)
    vals_a = np.concatenate(vals).astype(np.float32) if o else np.zeros(0, np.float32)
    offs_a = np.concatenate(offs).astype(np.int32) if o else np.zeros(0, np.int32)
    if vals_a.size == 0:  # an all-zero weight: one zero group keeps the buffers non-empty
        vals_a, offs_a = np.zeros(group, np.float32), np.zeros(group, np.int32)
    return Compressed(vals_a, offs_a, np.asarray(ptr, np.int32), 1, o,
                      int((w2d != 0).sum()))


def nonempty(c: Compressed) -> Compressed:
    """TIR buffers of zero elements are not allowed: an all-zero weight gets one zero
    (never read: every block's range is empty)."""
    if c.vals.size:
        return c
    return Compressed(np.zeros(c.block, np.float32), np.zeros(1, np.int32), c.ptr, c.block,
                      c.rows, 0)


# ------------------------------------------------------------------------------ the choice
def _table() -> dict:
    try:
        return json.loads(BREAKEVEN_FILE.read_text())
    except (OSError, ValueError):
        return {}


def isa_key(lanes: int, arch: str) -> str:
    """The break-even table's ISA key: ``avx512`` / ``avx2`` (x86), ``neon`` (aarch64)."""
    if arch == "aarch64":
        return "neon"
    return "avx512" if lanes >= 16 else "avx2"


def breakeven(isa: str, shape_class: str, block: int) -> tuple[float, str]:
    """``(density, source)``: below this density the sparse kernel of ``shape_class``
    (``conv1x1``, ``convkxk``, ``gemm``) is faster than the dense one on ``isa``;
    ``source`` says whether it was measured on that ISA."""
    table = _table()
    entry = table.get("isa", {}).get(isa)
    key = "block" if block > 1 else "unstructured"
    if entry is None:
        fallback = table.get("fallback", {})
        return float(fallback.get(shape_class, {}).get(key, 0.3)), \
            f"not measured on {isa}: {table.get('fallback_source', 'a conservative guess')}"
    return float(entry[shape_class][key]), f"measured ({entry.get('host', '?')})"


@dataclass(frozen=True)
class Choice:
    """The kernel a layer with constant weights gets, and why."""

    sparse: bool
    reason: str
    density: float
    block: int
    breakeven: float | None = None


def choose(w2d: np.ndarray, shape_class: str, isa: str, force: str | None = None) -> Choice:
    """Sparse or dense for ``w2d`` (outputs x taps) of ``shape_class`` on ``isa``.
    ``force``: ``"sparse"`` / ``"dense"`` (``EDGEC_SPARSE``) overrides the measurement."""
    density = float((w2d != 0).mean()) if w2d.size else 1.0
    block = block_size(w2d)
    if force == "dense":
        return Choice(False, "dense forced (EDGEC_SPARSE=dense)", density, block)
    if density >= 1.0:
        return Choice(False, "no zero weights", density, block)
    be, source = breakeven(isa, shape_class, block)
    if force == "sparse":
        return Choice(True, "sparse forced (EDGEC_SPARSE=sparse)", density, block, be)
    pattern = f"blocks of {block}" if block > 1 else "unstructured"
    if density < be:
        return Choice(True, f"density {density:.3f} ({pattern}) below the break-even "
                      f"{be:.2f} for {shape_class} on {isa}, {source}", density, block, be)
    return Choice(False, f"density {density:.3f} ({pattern}) at or above the break-even "
                  f"{be:.2f} for {shape_class} on {isa}, {source}", density, block, be)


# ------------------------------------------------------------------------------ the tiles
def pixel_tile(lanes: int, block: int, positions: int, channels: int) -> int:
    """Pixels per task of :func:`spmm_func`: ``vecs`` whole vectors, at most 4 and with
    ``block x vecs`` accumulators within about half the vector registers (16 of 32 zmm,
    8 of 16 ymm, 16 of 32 q), the tile's input (``channels`` rows of it) within 32 KiB of
    L1 where possible; among those the fewest vector steps over the map, the last tile
    shifted to end at the map's end (``ceil(P / M) * vecs``, plus half a vector per tile
    for its overhead). Fewer positions than one vector: all of them."""
    if positions < lanes:
        return positions
    budget = 16 if lanes >= 16 else 8 if lanes == 8 else 16
    most = max(1, min(4, budget // block, positions // lanes))
    while most > 1 and channels * most * lanes * 4 > 32 * 1024:
        most -= 1
    cost = {v: -(-positions // (v * lanes)) * (v + 0.5) for v in range(1, most + 1)}
    return min(cost, key=lambda v: (cost[v], -v)) * lanes


def _chunks(tasks: int, blocks: int, threads: int = 8) -> int:
    """Chunks the output blocks are cut into so that ``tasks * chunks`` keeps ``threads``
    busy (a small map has few pixel tiles)."""
    want = -(-4 * threads // max(tasks, 1))
    return max(1, min(blocks, want))


def _hsum(acc, n: int):
    """``acc[0] + ... + acc[n - 1]`` as a pairwise tree (a PrimExpr)."""
    terms = [acc[i] for i in range(n)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


def clamp_epilogue(lo, hi):
    """The epilogue on a float32 value: ``min(max(v, lo), hi)`` keeping NaN (the comparisons
    with NaN are false), as :mod:`..rewrites.nan_clamp`."""
    def f(v):
        if lo is not None:
            v = T.Select(v < T.float32(lo), T.float32(lo), v)
        if hi is not None:
            v = T.Select(v > T.float32(hi), T.float32(hi), v)
        return v
    return f


# ------------------------------------------------------------------------------ the kernels
def spmm_func(x_shape, y_shape, c: Compressed, positions: int, lanes: int, channels: int,
              lo: float | None = None, hi: float | None = None):
    """Pixels-in-lanes sparse x dense: ``x`` (``x_shape``, seen as ``[n, xlen]``: each
    image flattened), the compressed weight's buffers, ``bias [O_pad]``, output ``y``
    (``y_shape``, seen as ``[n, O, positions]``) with
    ``y[i, o, p] = clamp(bias[o] + sum_k W[o, k] * x[i, offs[k] + p])``; ``channels``:
    the input rows a tile reads (for its L1 footprint)."""
    c = nonempty(c)
    B, OC, NB = c.block, c.rows, len(c.ptr) - 1
    NNZB, P = len(c.offs), positions
    n = int(x_shape[0])
    xlen = int(np.prod(x_shape[1:]))
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    M = pixel_tile(lanes, B, P, channels)
    L = lanes if M % lanes == 0 else M   # one vector per step (a short map: all of it)
    V = M // L
    NT = -(-P // M)
    CH = _chunks(n * NT, NB)
    CB = -(-NB // CH)
    CH = -(-NB // CB)
    epi = clamp_epilogue(lo, hi)
    f32, i32 = "float32", "int32"

    # the last tile of a row is shifted left to end at P (it overlaps the one before and
    # writes the same values there): every tile is M whole vectors, no tail loop
    @T.prim_func(private=True)
    def spmm(x_: T.Buffer(x_shape, f32), vals: T.Buffer((NNZB * B,), f32),
             offs: T.Buffer((NNZB,), i32), ptr: T.Buffer((NB + 1,), i32),
             bias: T.Buffer((NB * B,), f32), y_: T.Buffer(y_shape, f32)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((n, xlen), f32, data=x_.data)
        y = T.decl_buffer((n, OC, P), f32, data=y_.data)
        for t in T.parallel(n * NT * CH):
            acc = T.alloc_buffer((B, V, L), f32, scope="local")
            for bi in range(T.min(CB, NB - (t % CH) * CB)):
                b = (t % CH) * CB + bi
                img = t // (NT * CH)
                p0 = T.min((t // CH) % NT * M, P - M)
                for r in T.unroll(B):
                    for v in T.unroll(V):
                        for j in T.vectorized(L):
                            acc[r, v, j] = bias[b * B + r]
                for k in range(ptr[b], ptr[b + 1]):
                    for r in T.unroll(B):
                        for v in T.unroll(V):
                            for j in T.vectorized(L):
                                acc[r, v, j] = acc[r, v, j] + vals[k * B + r] * \
                                    x[img, offs[k] + p0 + v * L + j]
                for r in T.unroll(B):
                    if b * B + r < OC:
                        for v in T.unroll(V):
                            for j in T.vectorized(L):
                                y[img, b * B + r, p0 + v * L + j] = epi(acc[r, v, j])


    return spmm.with_attr(KERNEL_ATTR, f"sparse-px(B={B})").with_attr(
        MACS_ATTR, int(n * c.nnz * P))


def spmv_func(x_shape, y_shape, c: Compressed, lo: float | None = None,
              hi: float | None = None):
    """Gather form for Gemm / MatMul: ``x`` (``x_shape``, seen as ``[rows, k]``), ``y``
    (``y_shape``, seen as ``[rows, O]``) with
    ``y[i, o] = clamp(bias[o] + sum W[o, j] * x[i, j])`` over the row's nonzeros. Blocks
    (``B > 1``): one gathered input times a vector of ``B`` values per step; unstructured
    (:func:`compress_gather`): ``G`` gathered inputs times ``G`` values, summed at the end."""
    c = nonempty(c)
    B, OC, NB, NV = c.block, c.rows, len(c.ptr) - 1, len(c.vals)
    k = int(x_shape[-1])
    rows = int(np.prod(x_shape[:-1]))
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    NO = len(c.offs)
    CH = _chunks(rows, NB, 2)
    CB = -(-NB // CH)
    CH = -(-NB // CB)
    G = GATHER
    epi = clamp_epilogue(lo, hi)
    f32, i32 = "float32", "int32"

    if B > 1:
        @T.prim_func(private=True)
        def spmv(x_: T.Buffer(x_shape, f32), vals: T.Buffer((NV,), f32),
                 offs: T.Buffer((NO,), i32), ptr: T.Buffer((NB + 1,), i32),
                 bias: T.Buffer((NB * B,), f32), y_: T.Buffer(y_shape, f32)):
            T.func_attr({"tirx.noalias": True})
            x = T.decl_buffer((rows, k), f32, data=x_.data)
            y = T.decl_buffer((rows, OC), f32, data=y_.data)
            for t in T.parallel(rows * CH):
                acc = T.alloc_buffer((B,), f32, scope="local")
                for bi in range(T.min(CB, NB - (t % CH) * CB)):
                    b = (t % CH) * CB + bi
                    for j in T.vectorized(B):
                        acc[j] = bias[b * B + j]
                    for q in range(ptr[b], ptr[b + 1]):
                        for j in T.vectorized(B):
                            acc[j] = acc[j] + vals[q * B + j] * x[t // CH, offs[q]]
                    for j in T.unroll(B):
                        if b * B + j < OC:
                            y[t // CH, b * B + j] = epi(acc[j])
    else:
        @T.prim_func(private=True)
        def spmv(x_: T.Buffer(x_shape, f32), vals: T.Buffer((NV,), f32),
                 offs: T.Buffer((NO,), i32), ptr: T.Buffer((NB + 1,), i32),
                 bias: T.Buffer((NB,), f32), y_: T.Buffer(y_shape, f32)):
            T.func_attr({"tirx.noalias": True})
            x = T.decl_buffer((rows, k), f32, data=x_.data)
            y = T.decl_buffer((rows, OC), f32, data=y_.data)
            for t in T.parallel(rows * CH):
                acc = T.alloc_buffer((G,), f32, scope="local")
                for bi in range(T.min(CB, NB - (t % CH) * CB)):
                    b = (t % CH) * CB + bi
                    for j in T.vectorized(G):
                        acc[j] = T.float32(0)
                    for q in range(ptr[b], ptr[b + 1]):
                        for j in T.vectorized(G):
                            acc[j] = acc[j] + vals[q * G + j] * x[t // CH, offs[q * G + j]]
                    y[t // CH, b] = epi(bias[b] + _hsum(acc, G))

    return spmv.with_attr(KERNEL_ATTR, f"sparse-gather(B={B})").with_attr(
        MACS_ATTR, int(rows * c.nnz))
