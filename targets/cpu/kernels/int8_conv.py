"""Integer kernels for QDQ convolutions on LLVM CPU targets.

A convolution as the ``quantize`` pass writes it (and the TVM ONNX frontend imports it)::

    y = conv(dq(Xq; sx, zx), dq(Wq; sw[o], 0))      then bias, ReLU, q(.; sy, zy) ...

is, by linearity, with the padding positions of ``Xq`` holding ``zx``::

    y[o] = sx * sw[o] * ( sum Xq * Wq[o]  -  zx * sum Wq[o] )
                         `-- int32 --'      `- constant -'

so the sum runs on integers -- 8-bit products accumulated in int32 -- and one multiply per
output returns to float, where the float epilogue the graph already has (bias, ReLU, and the
quantize of the next layer's input) is fused into the same kernel: activations stay 8-bit
between layers and no fp32 activation tensor is written.

The activation is re-laid out per kernel as ``A[n, c // D, y, x]``, one 32-bit word holding the
``D`` channels ``c..c+D-1`` of a pixel (padded with the zero point), and the weights at compile
time as
``B[o // L, c // D, kh, kw, o % L, c % D]``; one instruction adds ``D`` products into each of
``L`` int32 lanes::

    acc[n, o // L, y, x, o % L] += sum_{d < D} A[.., c // D, ..].d * B[o // L, c // D, .., o % L, d]

Per ISA (chosen from the target's CPU features):

==================  ====  ====  ================  =========================================
ISA                  L     D    A x B             instruction
==================  ====  ====  ================  =========================================
avx512vnni           16    4    u8 x s8           vpdpbusd zmm (no saturation: i32 sums)
avxvnni               8    4    u8 x s8           vpdpbusd ymm (VEX)
avx512bw             16    2    s16 x s16         vpmaddwd zmm (A = X - zx: exact, no
avx2                  8    2    s16 x s16         vpmaddwd ymm  vpmaddubsw saturation)
avx512bw-s7          16    4    u8 x s7           vpmaddubsw + vpmaddwd(1) zmm, 7-bit weights
avx2-s7               8    4    u8 x s7           vpmaddubsw + vpmaddwd(1) ymm, 7-bit weights
aarch64 +dotprod      4    4    s8 x s8           sdot (A = X - 128, zero point shifted)
other                 4    2    s16 x s16         plain vector code
==================  ====  ====  ================  =========================================

``vpmaddubsw`` (u8 x s8 -> saturating s16 pair sums) is exact only while a pair sum fits
int16: ``255 * (|w1| + |w2|) <= 32767``, i.e. weights within [-64, 64] (255 * 127 * 2
overflows). A layer whose int8 weights all lie there (``quantize weight_bits=7``, the default
for x86 targets without VNNI) takes the ``-s7`` form on AVX2 / AVX-512BW: four products per
lane and step from 8-bit operands, half the bytes of the s16 form; other layers keep the exact
s16 form. Which form a kernel was built for travels as the block annotation ``ISA_ATTR``.

Depthwise QDQ convolutions read the 8-bit input directly (dequantized while padding) and
compute in float; their weights are small.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from .backend import relax, tvm
from .cpu_int8_winograd import int8_winograd_te, transform_weight_int8, wino8_applies

log = logging.getLogger("edgec.cpu_int8")

INT8_CONV_BLOCK = "edgec_conv2d_int8"
INT8_PX_BLOCK = "edgec_conv2d_int8px"
ISA_ATTR = "edgec_int8_isa"  # block annotation: the DotISA name the kernel was built for
PX_TILE = "edgec_px_tile"  # (cpu_kernels.PX_TILE: the tile a pixel kernel was computed for)


# ---------------------------------------------------------------------------------- ISAs
@dataclass(frozen=True)
class DotISA:
    name: str
    lanes: int       # int32 accumulators per vector
    depth: int       # products summed into each lane per instruction
    a_dtype: str     # packed activation element type
    b_dtype: str     # packed weight element type
    a_shift: int | None  # None: int16 forms, A = X - zx; else 8-bit forms, A = X moved into
    #                      A's type (u8: +128 for an int8 input; s8: -128 for a uint8 input)
    llvm: str | None     # the LLVM intrinsic; None: plain vector code, no tensorize
    widen: str | None = None  # vpmaddwd after vpmaddubsw: s16 pair sums -> s32 (times ones)

    @property
    def intrin_name(self) -> str:
        return f"edgec_dot_{self.name}".replace("-", "_")

    @property
    def accumulates(self) -> bool:
        """Whether the instruction adds into the accumulator itself (vpdpbusd, sdot)."""
        return self.depth == 4 and self.widen is None

    @property
    def max_weight(self) -> int:
        """The largest |weight| the form is exact for (see the module docstring)."""
        return 64 if self.widen else 127


ISAS = {
    "avx512vnni": DotISA("avx512vnni", 16, 4, "uint8", "int8", 0,
                         "llvm.x86.avx512.vpdpbusd.512"),
    "avxvnni": DotISA("avxvnni", 8, 4, "uint8", "int8", 0, "llvm.x86.avx512.vpdpbusd.256"),
    "avx512bw": DotISA("avx512bw", 16, 2, "int16", "int16", None,
                       "llvm.x86.avx512.pmaddw.d.512"),
    "avx2": DotISA("avx2", 8, 2, "int16", "int16", None, "llvm.x86.avx2.pmadd.wd"),
    "avx512bw-s7": DotISA("avx512bw-s7", 16, 4, "uint8", "int8", 0,
                          "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    "avx2-s7": DotISA("avx2-s7", 8, 4, "uint8", "int8", 0, "llvm.x86.avx2.pmadd.ub.sw",
                      "llvm.x86.avx2.pmadd.wd"),
    "dotprod": DotISA("dotprod", 4, 4, "int8", "int8", -128,
                      "llvm.aarch64.neon.sdot.v4i32.v16i8"),
    "generic": DotISA("generic", 4, 2, "int16", "int16", None, None),
}


def select_isa(target) -> DotISA:
    """The best integer dot product the target's CPU has."""
    from tvm.target.codegen import target_has_features

    def has(f):
        try:
            return bool(target_has_features(f, target))
        except Exception:  # noqa: BLE001 - a feature LLVM does not know for this arch
            return False

    for feature in ("avx512vnni", "avxvnni", "avx512bw", "avx2", "dotprod"):
        if has(feature):
            return ISAS[feature]
    return ISAS["generic"]


def isa_for_weights(isa: DotISA, wq: np.ndarray) -> DotISA:
    """The form a layer with int8 weights ``wq`` takes on the target's ``isa``: the 8-bit
    ``-s7`` form where the weights fit it (:attr:`DotISA.max_weight`), else ``isa``."""
    narrow = ISAS.get(isa.name + "-s7")
    if narrow is not None and wq.size and int(np.abs(wq.astype(np.int32)).max()) <= \
            narrow.max_weight:
        return narrow
    return isa


_REGISTERED: set[str] = set()


def register_intrin(isa: DotISA) -> str | None:
    """Register ``isa``'s tensor intrinsic (once per process); its name, or None."""
    if isa.llvm is None:
        return None
    name = isa.intrin_name
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    L, D = isa.lanes, isa.depth
    at, bt = isa.a_dtype, isa.b_dtype
    bits = 32 // D
    b_vec, a_wide = f"{bt}x{L * D}", f"{at}x{L * D}"
    acc = f"int32x{L}"
    llvm_name = isa.llvm
    mask = (1 << bits) - 1
    u32, i32 = "uint32", "int32"  # (names, not literals, in the TVMScript annotations)

    # A: one 32-bit word holding D values of A's type (see int8_conv_te)
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((1,), u32, offset_factor=1),
             B: T.Buffer((L, D), bt, offset_factor=1),
             C: T.Buffer((L,), i32, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:1], B[0:L, 0:D])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, D):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", T.Cast(at, T.bitwise_and(
                            T.shift_right(A[0], T.Cast("uint32", vk * bits)),
                            T.uint32(mask)))) * T.Cast("int32", B[vi, vk])

    pair, ones = f"int16x{L * 2}", T.broadcast(T.int16(1), L * 2)
    widen = isa.widen
    if isa.widen:  # vpmaddubsw (u8 x s7 -> s16 pair sums, exact) + vpmaddwd by ones
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((1,), u32, offset_factor=1),
                 B: T.Buffer((L, D), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:1], B[0:L, 0:D])
                T.writes(C[0:L])
                a32 = T.reinterpret(A[0], dtype="int32")
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=acc) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(widen), T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(llvm_name),
                        T.reinterpret(T.broadcast(a32, L), dtype=a_wide),
                        B.vload([0, 0], dtype=b_vec), dtype=pair), ones, dtype=acc)
    elif isa.depth == 4:  # vpdpbusd / sdot: acc += 4-products sums, operands as i8 vectors
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((1,), u32, offset_factor=1),
                 B: T.Buffer((L, D), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:1], B[0:L, 0:D])
                T.writes(C[0:L])
                a32 = T.reinterpret(A[0], dtype="int32")
                C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name), C.vload([0], dtype=acc),
                    T.reinterpret(T.broadcast(a32, L), dtype=a_wide),
                    B.vload([0, 0], dtype=b_vec), dtype=acc)
    else:  # vpmaddwd: s16 pairs -> s32, added to C
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((1,), u32, offset_factor=1),
                 B: T.Buffer((L, D), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:1], B[0:L, 0:D])
                T.writes(C[0:L])
                a32 = T.reinterpret(A[0], dtype="int32")
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=acc) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name),
                    T.reinterpret(T.broadcast(a32, L), dtype=a_wide),
                    B.vload([0, 0], dtype=b_vec), dtype=acc)

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


def register_px_intrin(isa: DotISA) -> str | None:
    """The same instruction turned around for :func:`int8_conv1x1_px_te`: the lanes are ``L``
    pixels (one vector load of ``L`` packed words) and the ``D`` weights of one output
    channel are broadcast from one 32-bit word."""
    if isa.llvm is None:
        return None
    name = isa.intrin_name + "_px"
    if name in _REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    L, D = isa.lanes, isa.depth
    at, bt = isa.a_dtype, isa.b_dtype
    bits = 32 // D
    b_vec, a_wide, b_word = f"{bt}x{L * D}", f"{at}x{L * D}", f"{bt}x{D}"
    acc, a_words = f"int32x{L}", f"uint32x{L}"
    llvm_name = isa.llvm
    mask = (1 << bits) - 1
    u32, i32 = "uint32", "int32"
    add_c = not isa.accumulates  # vpmaddwd does not accumulate
    pair, ones = f"int16x{L * 2}", T.broadcast(T.int16(1), L * 2)
    widen = isa.widen

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((L,), u32, offset_factor=1),
             B: T.Buffer((D,), bt, offset_factor=1),
             C: T.Buffer((L,), i32, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:L], B[0:D])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, D):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", T.Cast(at, T.bitwise_and(
                            T.shift_right(A[vi], T.Cast("uint32", vk * bits)),
                            T.uint32(mask)))) * T.Cast("int32", B[vk])

    if widen:  # vpmaddubsw + vpmaddwd by ones (see register_intrin)
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((L,), u32, offset_factor=1),
                 B: T.Buffer((D,), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:L], B[0:D])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=acc) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(widen), T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(llvm_name),
                        T.reinterpret(A.vload([0], dtype=a_words), dtype=a_wide),
                        T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], dtype=b_word),
                                                                dtype="int32"), L),
                                      dtype=b_vec), dtype=pair), ones, dtype=acc)
    elif not add_c:
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((L,), u32, offset_factor=1),
                 B: T.Buffer((D,), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:L], B[0:D])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name), C.vload([0], dtype=acc),
                    T.reinterpret(A.vload([0], dtype=a_words), dtype=a_wide),
                    T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], dtype=b_word),
                                                            dtype="int32"), L), dtype=b_vec),
                    dtype=acc)
    else:
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((L,), u32, offset_factor=1),
                 B: T.Buffer((D,), bt, offset_factor=1),
                 C: T.Buffer((L,), i32, offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:L], B[0:D])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=acc) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name),
                    T.reinterpret(A.vload([0], dtype=a_words), dtype=a_wide),
                    T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], dtype=b_word),
                                                            dtype="int32"), L), dtype=b_vec),
                    dtype=acc)

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


# ---------------------------------------------------------------------------------- TE
def _ints(xs) -> list[int]:
    return [int(x) for x in xs]


def pack_weight(wq: np.ndarray, isa: DotISA) -> np.ndarray:
    """``W[o, c, kh, kw]`` -> ``B[o // L, c // D, kh, kw, o % L, c % D]`` (zero padded)."""
    L, D = isa.lanes, isa.depth
    oc, ic, kh, kw = wq.shape
    ocb, icb = -(-oc // L), -(-ic // D)
    w = np.zeros((ocb * L, icb * D, kh, kw), isa.b_dtype)
    w[:oc, :ic] = wq
    return np.ascontiguousarray(w.reshape(ocb, L, icb, D, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def int8_conv_te(xq, wp, corr, scale, zx: int, oc: int, strides, pads, dil, isa: DotISA,
                 view=None, requant=None, residual=None):
    """TE of the integer convolution; returns the float output ``[n, oc, oh, ow]`` (or with
    ``requant``, the next layer's 8-bit input: :func:`finish_int8`).

    ``view`` (for :func:`int8_matmul_te`): ``(shape, load)``, the NCHW shape the kernel sees
    and ``load(n, c, y, x)`` reading it from ``xq``."""
    from tvm import te, tirx

    nb, c, h, w = _ints(xq.shape) if view is None else view[0]
    load = (lambda n, ch, y, x: xq[n, ch, y, x]) if view is None else view[1]
    ocb, icb, kh, kw, L, D = _ints(wp.shape)
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    za = za_of(isa, str(xq.dtype), zx)
    # int16 forms: A = X - zx (padding 0); 8-bit forms: A = X + (za - zx) in A's type
    shift = -zx if isa.a_shift is None else za - zx

    def conv_a(v):
        return (v.astype("int32") + shift).astype(isa.a_dtype)

    bits = 32 // D
    unsigned = "uint8" if bits == 8 else "uint16"

    def word(vals):  # D values of A's type, packed little-endian into one uint32
        out = None
        for d, v in enumerate(vals):
            e = v.astype(unsigned).astype("uint32")
            e = e << tirx.const(bits * d, "uint32") if d else e
            out = e if out is None else out | e
        return out

    def pack(n, cb, y, x):
        row, col = y - pt, x - pl
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        vals = []
        for d in range(D):
            ch = cb * D + d
            v = conv_a(load(n, tirx.min(ch, c - 1), row, col)) if c % D else \
                conv_a(load(n, ch, row, col))
            if c % D:  # channels past c (the last group) hold the zero point too
                v = tirx.if_then_else(ch < c, v, tirx.const(za, isa.a_dtype))
            vals.append(tirx.if_then_else(tirx.likely(inside), v, tirx.const(za, isa.a_dtype)))
        return word(vals)

    # A[n, c // D, y, x] holds channels c..c+D-1 of one pixel in one 32-bit word: the pack
    # is then whole-word stores (3.5x faster than byte stores), and each dot-product step
    # broadcasts one word
    ap = te.compute((nb, icb, h + pt + pb, w + pl + pr), pack, name="edgec_pad_int8")
    rc = te.reduce_axis((0, icb), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rd = te.reduce_axis((0, D), "rd")
    mask = tirx.const((1 << bits) - 1, "uint32")
    acc = te.compute(
        (nb, ocb, oh, ow, L),
        lambda n, o, y, x, b: te.sum(
            ((ap[n, rc, y * sh + ry * dh, x * sw + rx * dw] >> (rd * bits).astype("uint32"))
             & mask).astype(isa.a_dtype).astype("int32")
            * wp[o, rc, ry, rx, b, rd].astype("int32"), axis=[rc, ry, rx, rd]),
        name=INT8_CONV_BLOCK, attrs={ISA_ATTR: isa.name})
    if view is not None:  # a matmul: batch rows are the columns of a 1 x M image
        return finish_int8((ow, oc), lambda m, o: acc[0, o // L, 0, m, o % L],
                           lambda m, o: o, corr, scale, requant, residual)
    return finish_int8((nb, oc, oh, ow), lambda n, o, y, x: acc[n, o // L, y, x, o % L],
                       lambda n, o, y, x: o, corr, scale, requant, residual)


def finish_int8(shape, acc_at, chan, corr, scale, requant, residual=None):
    """The kernel's output from its int32 sums: ``(acc - corr[o]) * scale[o]`` (float), or
    with ``requant = (lo, hi, dtype)`` the quantized next activation directly::

        q = round(clamp(acc * scale[o] + corr[o], lo, hi))      (``corr`` then a float offset)

    into which :func:`requant_pass` folded bias, ReLU/Clip and the quantize step
    (:func:`round_clamp`). ``requant = (lo, hi, dtype, (a, b, c, lo2, hi2, dtype2))`` also
    adds the 8-bit tensor ``residual`` (:func:`requant_pass`)."""
    from tvm import te, tirx

    if requant is None:
        return te.compute(shape, lambda *i: (acc_at(*i) - corr[chan(*i)]).astype("float32")
                          * scale[chan(*i)], name="edgec_conv2d_int8_dequant")

    def body(*i):
        o = chan(*i)
        t = acc_at(*i).astype("float32") * scale[o] + corr[o]
        if len(requant) == 3:
            return round_clamp(t, requant)
        # a residual Add: t is the kernel's 8-bit output q (kept as the float value of its
        # clamped bit pattern), then, as onnxruntime's QLinearAdd,
        # round(clamp(q * a + r * b + c, lo2, hi2)) with r the other 8-bit input
        a, b, c, lo2, hi2, dt2 = requant[3]
        r = residual
        q = tirx.reinterpret("float32", _round_clamp_bits(t, requant[0], requant[1])) \
            - tirx.const(_ROUND_MAGIC, "float32")
        v = q * tirx.const(a, "float32") + r(*i).astype("float32") * tirx.const(b, "float32") \
            + tirx.const(c, "float32")
        return round_clamp(v, (lo2, hi2, dt2))

    return te.compute(shape, body, name="edgec_conv2d_int8_requant")


RESIDUAL = "residual"  # kernels[RESIDUAL, name]: a requantizing kernel's residual re-emitter
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: x + M is M + round_half_even(x) for |x| < 2**22


def round_clamp(t, requant):
    """``round(clamp(t, lo, hi))`` as 8-bit ``dtype`` for ``requant = (lo, hi, dtype)``:
    ``t + M`` (one float add; the float grid there has spacing 1, so the add rounds half
    to even) read as int32 is ``M + round(t)``, whose bit pattern orders as the value does;
    it is clamped to ``M + rint(lo)``..``M + rint(hi)`` (rounding commutes with clamping)
    and truncated: the low byte of ``M + r`` is ``r``'s (``M``'s low bits are zero). One
    add, two integer compares and a truncation -- no round and no float->int conversion;
    a value so large that ``t + M`` no longer has spacing 1, or negative enough to make
    it negative, lands beyond a bound and is clamped all the same."""
    lo, hi, dtype = requant
    return _round_clamp_bits(t, lo, hi).astype(dtype)


def _round_clamp_bits(t, lo, hi):
    """``M + round(clamp(t, lo, hi))`` as int32 bits (:func:`round_clamp`)."""
    from tvm import tirx

    magic = int(np.float32(_ROUND_MAGIC).view(np.int32))
    bits = tirx.reinterpret("int32", t + tirx.const(_ROUND_MAGIC, "float32"))
    return tirx.max(tirx.min(bits, tirx.const(magic + int(np.rint(hi)), "int32")),
                    tirx.const(magic + int(np.rint(lo)), "int32"))


def px_accumulators(isa: DotISA) -> int:
    """Accumulator vectors per pixel-kernel tile: 16 of 32 vector registers (AVX-512,
    NEON), 8 of 16 (AVX2, SSE)."""
    return 16 if isa.lanes == 16 or isa.name == "dotprod" else 8


def px_tile(isa: DotISA, shape, wshape, strides, pads):
    """The tile (:func:`cpu_kernels.px_tile`; ``L`` pixels per vector, the ISA's
    accumulator budget, input pixels of ``ceil(C / D)`` words) of the pixel-oriented
    kernel for a 1x1 stride-1 unpadded convolution, else None."""
    from .cpu_kernels import px_tile as tile

    n, c, h, w = shape
    if tuple(wshape[2:]) != (1, 1) or list(strides) != [1, 1] or any(pads):
        return None
    return tile(isa.lanes, px_accumulators(isa), h, w, 4 * -(-c // isa.depth),
                int(wshape[0]))


def px_applies(isa: DotISA, shape, wshape, strides, pads, dil) -> bool:
    """Whether a convolution takes :func:`int8_conv1x1_px_te` (see :func:`px_tile`)."""
    return px_tile(isa, shape, wshape, strides, pads) is not None


def pack_weight_px(wq: np.ndarray, isa: DotISA, rows: int) -> np.ndarray:
    """``W[o, c, 1, 1]`` -> ``B[o // R, c // D, o % R, c % D]`` (``R`` = the tile's ``rows``,
    zero padded): one tile's weights for one reduction step are one contiguous run of
    words, and only ``oc`` up to a multiple of the tile is computed."""
    R, D = rows, isa.depth
    oc, ic = wq.shape[:2]
    ocb, icb = -(-oc // R), -(-ic // D)
    w = np.zeros((ocb * R, icb * D), isa.b_dtype)
    w[:oc, :ic] = wq.reshape(oc, ic)
    return np.ascontiguousarray(w.reshape(ocb, R, icb, D).transpose(0, 2, 1, 3))


def int8_conv1x1_px_te(xq, wp, corr, scale, zx: int, oc: int, isa: DotISA, tile,
                       requant=None, residual=None):
    """1x1 stride-1 integer convolution with pixels in the vector lanes::

        acc[n, o, y, x] += sum_d A[n, c // D, y, x].d * B[o // R, c // D, o % R, d]

    over the map as :func:`px_tile` views it: one flat row of ``H*W`` pixels when they fill
    whole vectors (contiguous in NCHW), else rows padded to whole vectors (the padding
    holds the zero point; its results are never read). The accumulators of one output
    channel are ``L`` consecutive pixels -- the layout of the NCHW output -- so the
    requantizing epilogue reads and stores whole vectors; with output channels in the lanes
    (:func:`int8_conv_te`) it first transposes the tile, which costs more than the dot
    products when the convolution has few input channels (MobileNet's expansions and
    projections)."""
    from tvm import te, tirx

    nb, c, h, w = _ints(xq.shape)
    ocb, icb, R, D = _ints(wp.shape)
    hv, wv, wpad, vecs, rows = tile
    za = za_of(isa, str(xq.dtype), zx)
    shift = -zx if isa.a_shift is None else za - zx
    bits = 32 // D
    unsigned = "uint8" if bits == 8 else "uint16"

    def at(y, x):  # the view's (y, x) in the map (a flat row: x // w, x % w)
        return (y, x) if hv == h else (x // w, x % w)

    def pack(n, cb, y, x):
        out = None
        for d in range(D):
            ch = cb * D + d
            v = (xq[n, tirx.min(ch, c - 1), *at(y, tirx.min(x, wv - 1))].astype("int32")
                 + shift).astype(isa.a_dtype)
            keep = x < wv if c % D == 0 else tirx.all(ch < c, x < wv)
            v = tirx.if_then_else(keep, v, tirx.const(za, isa.a_dtype))
            e = v.astype(unsigned).astype("uint32")
            e = e << tirx.const(bits * d, "uint32") if d else e
            out = e if out is None else out | e
        return out

    ap = te.compute((nb, icb, hv, wpad), pack, name="edgec_pad_int8")
    rc = te.reduce_axis((0, icb), "rc")
    rd = te.reduce_axis((0, D), "rd")
    mask = tirx.const((1 << bits) - 1, "uint32")
    acc = te.compute(
        (nb, ocb * R, hv, wpad),
        lambda n, o, y, x: te.sum(
            ((ap[n, rc, y, x] >> (rd * bits).astype("uint32")) & mask
             ).astype(isa.a_dtype).astype("int32")
            * wp[o // R, rc, o % R, rd].astype("int32"), axis=[rc, rd]),
        name=INT8_PX_BLOCK, attrs={PX_TILE: [vecs, rows], ISA_ATTR: isa.name})
    if hv == h:
        acc_at = lambda n, o, y, x: acc[n, o, y, x]  # noqa: E731
    else:
        acc_at = lambda n, o, y, x: acc[n, o, 0, y * w + x]  # noqa: E731
    return finish_int8((nb, oc, h, w), acc_at, lambda n, o, y, x: o, corr, scale, requant,
                       residual)


def int8_matmul_te(xq, wp, corr, scale, zx: int, n_out: int, isa: DotISA, requant=None,
                   residual=None):
    """``Y[m, j] = sum_k dq(Xq)[m, k] * dq(Wq)[k, j]`` as a 1x1 integer convolution over a
    ``1 x M`` image with ``K`` channels: the ``M`` rows become the register tile's columns,
    so each weight vector loaded serves up to 16 rows (and batch 1 is an int8 GEMV reading
    a quarter of the fp32 weight bytes)."""
    m, k = _ints(xq.shape)
    return int8_conv_te(xq, wp, corr, scale, zx, n_out, (1, 1), (0, 0, 0, 0), (1, 1), isa,
                        view=((1, k, 1, m), lambda n, ch, y, x: xq[x, ch]), requant=requant,
                        residual=residual)


def za_of(isa: DotISA, x_dtype: str, zx: int) -> int:
    """The packed activation's value for a zero input (what padding holds)."""
    if isa.a_shift is None:
        return 0
    if isa.a_dtype == "uint8":
        return zx + (128 if x_dtype == "int8" else 0)
    return zx - (128 if x_dtype == "uint8" else 0)


def q_dwconv_te(xq, wt, zx: int, strides, pads, dil, lanes: int, bias=None, requant=None):
    """Depthwise convolution reading the 8-bit input: ``(Xq - zx)`` converted while padding
    (the input scale is folded into ``wt``), float sums. With ``requant = (lo, hi, dtype)``
    (``wt`` then also carries the output's 1/scale, ``bias`` its zero point) the output is
    the next layer's 8-bit input, ``round(clamp(acc + bias[c], lo, hi))``."""
    from .cpu_kernels import dwconv_te

    def load(n, c_, y, x):
        return (xq[n, c_, y, x].astype("int32") - zx).astype("float32")

    def requantize(v, n, c_, y, x):
        return round_clamp(v + bias[c_], requant)

    return dwconv_te(xq, wt, strides, pads, dil, load=load, lanes=lanes,
                     finish=None if requant is None else requantize)


def make_quantize_legalizer():
    """relax.quantize with constant scales: ``clip(round(x * (1/s)) + zp)``. The default
    divides (a ``vdivps`` per vector in every requantizing epilogue); onnxruntime's fused
    QLinearConv also multiplies by a folded scale, so results agree to the rounding step."""
    from tvm import te, tirx
    from tvm.relax.transform.legalize_ops.qdq import _quantize as default

    def legalize(bb, call):
        data, scale, zp = call.args
        s, z = _const(scale), _const(zp)
        if s is None or z is None or str(data.ty.dtype) != "float32" or \
                s.dtype != np.float32 or not np.all(s != 0):
            return default(bb, call)
        inv = (1.0 / s.astype(np.float64)).astype(np.float32)
        axis = int(call.attrs.axis)
        out_dtype = str(call.attrs.out_dtype)
        ndim = len(data.ty.shape.values) if data.ty.shape is not None else 0
        axis = axis % ndim if ndim else 0

        def te_q(x, inv_t, z_t):
            def f(*i):
                iv = (tirx.const(float(inv.reshape(-1)[0]), "float32") if inv.size == 1
                      else inv_t[i[axis]])
                zv = (tirx.const(float(z.reshape(-1)[0]), "float32") if z.size == 1
                      else z_t[i[axis]].astype("float32"))
                v = te.round(x[i] * iv) + zv
                lo = tirx.min_value(out_dtype).astype("float32")
                hi = tirx.max_value(out_dtype).astype("float32")
                return te.max(te.min(v, hi), lo).astype(out_dtype)
            return te.compute(x.shape, f, name="quantized")

        return bb.call_te(te_q, data, relax.const(inv.reshape(-1)),
                          relax.const(z.reshape(-1)), primfunc_name_hint="quantize")

    return legalize


# ---------------------------------------------------------------------------------- rewrite
def _const(expr):
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _scalar(expr):
    v = _const(expr)
    if v is None or v.size != 1:
        return None
    return v.reshape(())[()]


def rewrite_pass(target, record: dict | None = None, kernels: dict | None = None):
    """Relax pass, run before constant folding: QDQ Conv -> integer kernels.

    ``kernels`` (if given) receives, per emitted kernel (by PrimFunc name), how to emit it
    again with a requantizing output: what :func:`requant_pass` needs."""
    kernels = {} if kernels is None else kernels
    isa = select_isa(target)
    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    dq_op = tvm.ir.Op.get("relax.dequantize")
    q_op = tvm.ir.Op.get("relax.quantize")
    pool_op = tvm.ir.Op.get("relax.nn.max_pool2d")
    matmul_op = tvm.ir.Op.get("relax.matmul")
    permute_op = tvm.ir.Op.get("relax.permute_dims")

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.stats = {"isa": isa.name, "conv2d": 0, "dwconv2d": 0, "matmul": 0,
                          "float": {}}

        def _dq(self, expr):
            if not isinstance(expr, relax.Var):
                return None
            b = self.lookup_binding(expr)
            if isinstance(b, relax.Call) and b.op == dq_op:
                return b
            return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call, relax.Call) and call.op == q_op:
                return self._pool(call)
            if not (isinstance(call, relax.Call) and call.op in (conv_op, matmul_op)):
                return call
            if all(self._dq(a) is None for a in call.args[:2]):
                return call  # a float layer, not a QDQ one left in float
            try:
                return self._rewrite(call) if call.op == conv_op else self._matmul(call)
            except _Skip as e:
                self.stats["float"][str(e)] = self.stats["float"].get(str(e), 0) + 1
                return call

        def _pool(self, q):
            """q(maxpool(dq(Xq; s, z)); s, z) = maxpool(Xq): max commutes with the
            increasing dequantize map, and padding with the type's minimum (0 for uint8)
            never wins over a real value. The pool then reads 8-bit data."""
            mp = self.lookup_binding(q.args[0]) if isinstance(q.args[0], relax.Var) else None
            if not (isinstance(mp, relax.Call) and mp.op == pool_op):
                return q
            dq = self._dq(mp.args[0])
            if dq is None:
                return q
            xq = dq.args[0]
            same = all(_const(a) is not None and _const(b) is not None and
                       np.array_equal(_const(a), _const(b))
                       for a, b in ((q.args[1], dq.args[1]), (q.args[2], dq.args[2])))
            if not same or str(q.attrs.out_dtype) != str(xq.ty.dtype):
                return q
            self.stats["maxpool"] = self.stats.get("maxpool", 0) + 1
            return relax.Call(pool_op, [xq], mp.attrs)

        def _activation(self, dqx, rank: int, what: str):
            """Xq, its dtype, scale and zero point, from ``dq(Xq)`` with one scale."""
            if dqx is None:
                raise _Skip(f"{what}input or weight not dequantized")
            xq = dqx.args[0]
            xdt = str(xq.ty.dtype)
            sx, zx = _scalar(dqx.args[1]), _scalar(dqx.args[2])
            if xdt not in ("uint8", "int8") or sx is None or zx is None:
                raise _Skip(f"{what}activation not 8-bit with one scale")
            shape = _static(xq)
            if shape is None:
                raise _Skip(f"{what}dynamic shape")
            if len(shape) != rank:
                raise _Skip(f"{what}input rank {len(shape)}, not {rank}")
            return xq, xdt, sx, zx

        def _matmul(self, call):
            """``dq(Xq)[M, K] @ W`` with ``W = dq(Wq)[K, N]`` or ``permute(dq(Wq)[N, K])``
            (Gemm with transB), per-channel scales along N -> :func:`int8_matmul_te`."""
            if call.attrs.out_dtype not in (None, "", "void", "float32"):
                raise _Skip("matmul: out_dtype")
            w, transposed = call.args[1], False
            wb = self.lookup_binding(w) if isinstance(w, relax.Var) else None
            if isinstance(wb, relax.Call) and wb.op == permute_op and (
                    wb.attrs.axes is None or _ints(wb.attrs.axes) == [1, 0]):
                w, transposed = wb.args[0], True
            dqx, dqw = self._dq(call.args[0]), self._dq(w)
            xq, xdt, sx, zx = self._activation(dqx if dqw is not None else None, 2,
                                               "matmul: ")
            wq, sw, zw = (_const(x) for x in dqw.args[:3])
            if wq is None or sw is None or zw is None or wq.dtype != np.int8 or wq.ndim != 2:
                raise _Skip("matmul: weight not constant 2-D int8")
            if np.any(zw != 0):
                raise _Skip("matmul: weight zero point not 0")
            axis = int(dqw.attrs.axis) % 2
            if not transposed:  # [K, N] -> [N, K]: the scale's axis must be N's
                wq, axis = wq.T, 1 - axis
            n = wq.shape[0]
            if sw.size not in (1, n) or (sw.size == n and n > 1 and axis != 0):
                raise _Skip("matmul: weight scale not per output column")
            sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (n,))
            wq = np.ascontiguousarray(wq)
            lisa = self._layer_isa(wq)
            za = za_of(lisa, xdt, int(zx))
            corr = (za * wq.astype(np.int64).sum(1)).astype(np.int32)
            scale = (np.float32(sx) * sw).astype(np.float32)
            self.stats["matmul"] += 1
            return self._int8_kernel(int8_matmul_te, lisa, xq,
                                     pack_weight(wq[:, :, None, None], lisa),
                                     corr, scale, (int(zx), n), "matmul_int8")

        def _layer_isa(self, wq):
            """The target's ISA, or its 7-bit-weight form where the weights fit it."""
            lisa = isa_for_weights(isa, wq)
            if lisa is not isa:
                self.stats["weights_7bit"] = self.stats.get("weights_7bit", 0) + 1
            return lisa

        def _int8_kernel(self, te_fn, isa, xq, wpk, corr, scale, tail, name):
            """Emit an integer kernel (float output) and remember how to emit it with the
            requantizing one: ``(acc - corr) * scale + bias`` times ``inv`` plus ``zp``
            is ``acc * s2 + b2``."""
            call = self.builder_.call_te(
                functools.partial(te_fn, isa=isa), xq, relax.const(wpk), relax.const(corr),
                relax.const(scale), *tail, primfunc_name_hint=name,
                primfunc_attrs={"op_pattern": 4})

            def remake(bb, x_new, inv, bias, zp, rq):
                s64 = scale.astype(np.float64)
                s2 = (s64 * inv).astype(np.float32)
                b2 = ((bias - corr.astype(np.float64) * s64) * inv + zp).astype(np.float32)

                def emit(bb_, x_, rq_, suffix, **residual):
                    return bb_.call_te(functools.partial(te_fn, isa=isa, requant=rq_), x_,
                                       relax.const(wpk), relax.const(b2), relax.const(s2),
                                       *tail, **residual, primfunc_name_hint=name + suffix,
                                       primfunc_attrs={"op_pattern": 4})

                out = emit(bb, x_new, rq, "_rq")
                # (the residual fold re-emits it with a second, residual epilogue)
                kernels[RESIDUAL, out.args[0].name_hint] = (
                    lambda bb_, x_, r, res: emit(bb_, x_, (*rq, res), "_res", residual=r),
                    len(scale))
                return out

            kernels[call.args[0].name_hint] = (remake, len(scale))
            return call

        def _rewrite(self, call):
            a = call.attrs
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or \
                    a.out_layout != "NCHW" or a.out_dtype not in (None, "", "float32"):
                raise _Skip("layout or out_dtype")
            dqx, dqw = self._dq(call.args[0]), self._dq(call.args[1])
            xq, xdt, sx, zx = self._activation(dqx if dqw is not None else None, 4, "")
            shape = xq.ty.shape
            wq, sw, zw = (_const(x) for x in dqw.args[:3])
            if wq is None or sw is None or zw is None or wq.dtype != np.int8 or wq.ndim != 4:
                raise _Skip("weight not constant int8")
            if np.any(zw != 0):
                raise _Skip("weight zero point not 0")
            oc = wq.shape[0]
            if sw.size not in (1, oc) or (sw.size == oc and oc > 1 and
                                          int(dqw.attrs.axis) not in (0, -4)):
                raise _Skip("weight scale not per output channel")
            sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (oc,))
            groups = int(a.groups)
            strides, dil, pads = _ints(a.strides), _ints(a.dilation), _ints(a.padding)
            c = int(shape.values[1])
            bb = self.builder_
            if groups == 1 and wino8_applies(
                    isa, _ints(shape.values), wq.shape, strides, pads, dil,
                    weights_7bit=isa_for_weights(isa, wq) is not isa):
                # integer Winograd F(2, 3) (x86 without VNNI): exact, 1/4 in the scale
                self.stats["conv2d"] += 1
                self.stats["winograd"] = self.stats.get("winograd", 0) + 1
                scale = (np.float32(sx) * sw * np.float32(0.25)).astype(np.float32)
                return self._int8_kernel(int8_winograd_te, isa, xq,
                                         transform_weight_int8(wq, isa.lanes),
                                         np.zeros(oc, np.int32), scale, (int(zx), oc, pads),
                                         "conv2d_int8wino")
            if groups == 1:
                lisa = self._layer_isa(wq)
                za = za_of(lisa, xdt, int(zx))
                corr = (za * wq.reshape(oc, -1).astype(np.int64).sum(1)).astype(np.int32)
                scale = (np.float32(sx) * sw).astype(np.float32)
                self.stats["conv2d"] += 1
                tile = px_tile(lisa, _ints(shape.values), wq.shape, strides, pads)
                if tile is not None:
                    return self._int8_kernel(functools.partial(int8_conv1x1_px_te, tile=tile),
                                             lisa, xq, pack_weight_px(wq, lisa, tile[4]),
                                             corr, scale, (int(zx), oc), "conv2d_int8px")
                return self._int8_kernel(int8_conv_te, lisa, xq, pack_weight(wq, lisa), corr,
                                         scale, (int(zx), oc, strides, pads, dil),
                                         "conv2d_int8")
            if groups == c == oc and wq.shape[1] == 1:
                wt = (wq.astype(np.float32) * (np.float32(sx) * sw)[:, None, None, None]
                      ).astype(np.float32)
                self.stats["dwconv2d"] += 1
                call = bb.call_te(functools.partial(q_dwconv_te, lanes=isa.lanes), xq,
                                  relax.const(wt), int(zx), strides, pads, dil,
                                  primfunc_name_hint="dwconv2d_q",
                                  primfunc_attrs={"op_pattern": 4})

                def remake(bb_, x_new, inv, bias, zp, rq):  # sum * inv + (bias * inv + zp)
                    wt2 = (wt.astype(np.float64) * inv).astype(np.float32)
                    b2 = (bias * inv + zp).astype(np.float32)
                    return bb_.call_te(
                        functools.partial(q_dwconv_te, lanes=isa.lanes, requant=rq), x_new,
                        relax.const(wt2), int(zx), strides, pads, dil, bias=relax.const(b2),
                        primfunc_name_hint="dwconv2d_q_rq", primfunc_attrs={"op_pattern": 4})

                kernels[call.args[0].name_hint] = (remake, oc)
                return call
            raise _Skip("grouped convolution")

    @tvm.transform.module_pass(opt_level=0, name="EdgecQuantizedConv")
    def _pass(mod, _ctx):
        rw = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        out = rw.builder_.get()
        if record is not None and (rw.stats["conv2d"] or rw.stats["dwconv2d"]
                                   or rw.stats["matmul"] or rw.stats["float"]
                                   or rw.stats.get("maxpool")):
            record["int8"] = rw.stats
        return relax.transform.DeadCodeElimination()(out)

    return _pass


def _static(expr):
    """The static shape of a tensor-typed relax expression, else None."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return None
    return tuple(int(d) for d in shape.values)


def _uses(func) -> dict:
    """How often each relax Var is read in ``func`` (bindings and the function's result)."""
    counts: dict = {}

    def walk(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                walk(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                walk(f)
        elif isinstance(e, relax.TupleGetItem):
            walk(e.tuple_value)

    body = func.body
    for block in body.blocks:
        for b in block.bindings:
            walk(b.value)
    walk(body.body)
    return counts


def requant_pass(kernels: dict, record: dict | None = None):
    """Relax pass, run after constants are folded: fold the epilogue that ends in the next
    layer's quantize into the integer kernel::

        q(clamp(K + bias[o], lo, hi); s, z)  ->  round(clamp(acc * s2[o] + b2[o], lo', hi'))

    where ``K = (acc - corr[o]) * scale[o]`` is the kernel's float output (or a depthwise
    float sum), ``s2 = scale / s``, ``b2 = (bias - corr * scale) / s + z``,
    ``lo' = max(lo / s + z, qmin)``, ``hi' = min(hi / s + z, qmax)`` (``z`` an integer, so
    adding it before rounding moves only exact ties, by one step). ``clamp`` is any chain of
    ReLU / maximum / minimum with scalar constants (ONNX Clip). One multiply-add, a clamp and
    a round per output replace the dequantize, bias, clip and quantize steps; every
    intermediate must have no other reader."""
    q_op = tvm.ir.Op.get("relax.quantize")
    add_op = tvm.ir.Op.get("relax.add")
    relu_op = tvm.ir.Op.get("relax.nn.relu")
    max_op = tvm.ir.Op.get("relax.maximum")
    min_op = tvm.ir.Op.get("relax.minimum")
    call_tir_op = tvm.ir.Op.get("relax.call_tir")
    qrange = {"uint8": (0, 255), "int8": (-128, 127)}

    def clamp_of(val):
        """``("max" | "min", c, data)`` for max/min with a scalar constant, else None."""
        if val.op == relu_op:
            return "max", 0.0, val.args[0]
        if val.op in (max_op, min_op):
            kind, args = ("max" if val.op == max_op else "min"), list(val.args)
        elif val.op == call_tir_op and isinstance(val.args[1], relax.Tuple):
            name = val.args[0].name_hint.rstrip("0123456789_")
            if name not in ("maximum", "minimum"):
                return None
            kind, args = name[:3], list(val.args[1].fields)
        else:
            return None
        if len(args) != 2:
            return None
        c = _const(args[1])
        if c is None or c.size != 1:
            return None
        return kind, float(c.reshape(-1)[0]), args[0]

    @relax.expr_functor.mutator
    class _Folder(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.folded = 0
            self.var2val: dict = {}
            self.uses: dict = {}

        def visit_call_(self, call):
            if call.op == q_op:
                out = self._fold(call)
                if out is not None:
                    self.folded += 1
                    return out
            return super().visit_call_(call)

        def _single(self, v):
            if not isinstance(v, relax.Var) or self.uses.get(v, 0) != 1:
                return None
            val = self.var2val.get(v)
            return val if isinstance(val, relax.Call) else None

        @staticmethod
        def _quantize(q):
            """``(1/s, z, dtype)`` of a quantize with one positive scale, else None."""
            s, z = _scalar(q.args[1]), _scalar(q.args[2])
            dtype = str(q.attrs.out_dtype)
            if s is None or z is None or dtype not in qrange or float(s) <= 0:
                return None
            return 1.0 / float(s), float(z), dtype

        def _clamps(self, v):
            """The chain of scalar max/min (outermost first) read by ``v`` alone, and the
            call below it (or None)."""
            clamps, val = [], self._single(v)
            while val is not None:
                c = clamp_of(val)
                if c is None:
                    break
                clamps.append(c[:2])
                val = self._single(c[2])
            return clamps, val

        @staticmethod
        def _range(clamps, inv, zp, dtype):
            """The clamps as bounds on the quantized value: ``(lo', hi')``."""
            lo, hi = -np.inf, np.inf
            for kind, c in reversed(clamps):  # innermost first: max/min of a clamp
                lo, hi = ((max(lo, c), max(hi, c)) if kind == "max" else
                          (min(lo, c), min(hi, c)))
            qmin, qmax = qrange[dtype]
            lo2 = max(lo * inv + zp, qmin) if np.isfinite(lo) else qmin
            hi2 = min(hi * inv + zp, qmax) if np.isfinite(hi) else qmax
            return float(lo2), float(hi2)

        def _fold(self, q):
            qp = self._quantize(q)
            if qp is None:
                return None
            inv, zp, dtype = qp
            bias = None
            clamps, val = self._clamps(q.args[0])
            if val is not None and val.op == add_op:
                b = _const(val.args[1])
                if b is None:
                    return None
                bias = b
                val = self._single(val.args[0])
            if val is None or val.op != call_tir_op or \
                    val.args[0].name_hint not in kernels:
                return None
            remake, nch = kernels[val.args[0].name_hint]
            oty = val.ty
            rank = len(oty.shape.values) if oty.shape is not None else 0
            axis = 1 if rank == 4 else rank - 1
            if bias is None:
                bvec = np.zeros(nch)
            else:  # per output channel: all other axes 1 (broadcast from the right)
                bs = (1,) * (rank - bias.ndim) + bias.shape
                if len(bs) != rank or any(d != 1 for i, d in enumerate(bs) if i != axis) or \
                        bs[axis] not in (1, nch) or not np.all(np.isfinite(bias)):
                    return None
                bvec = np.broadcast_to(bias.astype(np.float64).reshape(-1), (nch,))
            x_new = self.visit_expr(val.args[1].fields[0])
            return remake(self.builder_, x_new, inv, bvec, zp,
                          (*self._range(clamps, inv, zp, dtype), dtype))

    dq_op = tvm.ir.Op.get("relax.dequantize")

    @relax.expr_functor.mutator
    class _ResidualFolder(_Folder._cls):
        """``q(clamp(dq(K) + dq(R)))`` with ``K`` a requantizing kernel's 8-bit output (one
        reader) and ``R`` another 8-bit tensor of the same shape, scalar scales: the add is
        the kernel's second epilogue, ``round(clamp(K * a + R * b + c))`` with
        ``a = sK / s``, ``b = sR / s``, ``c = z - zK * a - zR * b`` -- what onnxruntime's
        QLinearAdd computes (both roundings kept), without the float round trip."""

        def _fold(self, q):
            qp = self._quantize(q)
            if qp is None:
                return None
            inv, zp, dtype = qp
            clamps, val = self._clamps(q.args[0])
            if val is None or val.op != add_op:
                return None
            for kside, rside in ((0, 1), (1, 0)):
                dk = self._single(val.args[kside])
                dr = self.var2val.get(val.args[rside]) \
                    if isinstance(val.args[rside], relax.Var) else None
                if not (isinstance(dk, relax.Call) and dk.op == dq_op and
                        isinstance(dr, relax.Call) and dr.op == dq_op):
                    continue
                k = self._single(dk.args[0])
                if k is None or k.op != call_tir_op or \
                        (RESIDUAL, k.args[0].name_hint) not in kernels:
                    continue
                sk, zk, sr, zr = (_scalar(a) for a in (*dk.args[1:3], *dr.args[1:3]))
                r = dr.args[0]
                if any(v is None for v in (sk, zk, sr, zr)) or \
                        str(r.ty.dtype) not in qrange or _static(r) is None or \
                        _static(r) != _static(k):
                    continue
                sk, zk, sr, zr = (float(v) for v in (sk, zk, sr, zr))
                a, b = sk * inv, sr * inv
                res = (a, b, zp - zk * a - zr * b, *self._range(clamps, inv, zp, dtype), dtype)
                emit, _ = kernels[RESIDUAL, k.args[0].name_hint]
                return emit(self.builder_, self.visit_expr(k.args[1].fields[0]),
                            self.visit_expr(r), res)
            return None

    def run(folder_cls, mod):
        f = folder_cls(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                f.var2val = dict(relax.analysis.get_var2val(func))
                f.uses = _uses(func)
                f.builder_.update_func(gv, f.visit_expr(func))
        out = f.builder_.get()
        return (relax.transform.DeadCodeElimination()(out) if f.folded else out), f.folded

    @tvm.transform.module_pass(opt_level=0, name="EdgecFoldRequantize")
    def _pass(mod, _ctx):
        if not kernels:
            return mod
        mod, folded = run(_Folder, mod)
        mod, residual = run(_ResidualFolder, mod) if folded else (mod, 0)
        if record is not None and "int8" in record:
            record["int8"]["requant_fused"] = folded
            record["int8"]["residual_fused"] = residual
        return mod

    return _pass


class _Skip(Exception):
    pass


# ---------------------------------------------------------------------------------- schedule
def schedule_int8_conv(sch, block, isa: DotISA, max_cols: int) -> None:
    """Register tile: ``ob2`` blocks of ``L`` output channels x ``cols`` output columns of
    int32 accumulators; per reduction step ``ob2`` weight vectors and ``cols`` broadcast
    activations feed ``ob2 * cols`` dot-product instructions."""
    from .cpu_kernels import _extent, _fuse_epilogue, _parallel_pad, _pick_tile, \
        _vectorize_innermost

    n, o, y, x, b, rc, ry, rx, rd = sch.get_loops(block)
    if isa.lanes == 16:  # 32 zmm: 16 accumulators + weight + broadcast; a 16-column tile
        max_cols = 16     # also gives the epilogue whole vectors (7x7/2 stem: -18 %)
    cols = _pick_tile(_extent(sch, x), max_cols)
    # narrow rows (e.g. 7x7 maps, a matmul's few rows): two or three channel blocks per tile
    # keep enough independent accumulators busy
    oe = _extent(sch, o)
    ob2 = next((k for k in (2, 3) if k * cols <= max_cols and oe % k == 0), 1)
    oo, oi = sch.split(o, [None, ob2])
    xo, xi = sch.split(x, [None, cols])
    intrin = register_intrin(isa)
    if intrin is not None:
        sch.reorder(n, oo, y, xo, rc, ry, rx, oi, xi, b, rd)
    else:  # plain vector code: lanes innermost, the D products unrolled around them
        sch.reorder(n, oo, y, xo, rc, ry, rx, oi, xi, rd, b)
    epilogue = _fuse_epilogue(sch, block, xo)
    sch.parallel(sch.fuse(n, oo, y))
    sch.unroll(oi)
    sch.unroll(xi)
    if intrin is None:
        sch.unroll(rd)
        sch.vectorize(b)
    sch.decompose_reduction(block, rc)
    if intrin is not None:
        sch.tensorize(b, intrin)
    _vectorize_innermost(sch, epilogue)
    _parallel_pad(sch)


def schedule_int8_px(sch, block, isa: DotISA) -> None:
    """Register tile of :func:`int8_conv1x1_px_te` (:func:`cpu_kernels.schedule_px`): per
    reduction step ``vecs`` pixel-vector loads and ``rows`` broadcast weight words feed
    ``rows * vecs`` dot-product instructions."""
    from .cpu_kernels import _extent, schedule_px

    L = isa.lanes
    intrin = register_px_intrin(isa)
    n, o, y, x, rc, rd = sch.get_loops(block)

    def inner(xi):
        if intrin is None:  # (before the init is split off: vectorize needs the whole sum)
            sch.unroll(rd)
            sch.vectorize(xi)

    def after(xi):
        if intrin is not None:
            sch.tensorize(xi, intrin)

    schedule_px(sch, block, L, rd=rd if intrin is not None else None,
                inner=inner, after=after, innermost=None if intrin is not None else rd)
    for pad in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(pad).name_hint == "edgec_pad_int8":  # rows of words, vectors along x
            n_, cb, y_, x_ = sch.get_loops(pad)
            sch.parallel(sch.fuse(n_, cb, y_))
            if _extent(sch, x_) % L == 0:
                _, x_ = sch.split(x_, [None, L])
                sch.vectorize(x_)
