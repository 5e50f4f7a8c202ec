"""What the integer kernels share: the packed activation word, the epilogue from int32 sums
(float output, or requantized straight to the next layer's 8-bit input), and which ISA form
a kernel block was built for."""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from ..isa import ISA_ATTR, ISAS


_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: x + M is M + round_half_even(x) for |x| < 2**22



def pack_word(vals, bits: int):
    """``D`` values of ``bits`` bits each, packed little-endian into one uint32. Each value's
    bit pattern is taken through int32 and a mask (a zero extension, as ``uint8`` would be):
    a negative constant -- the padding value ``zx - 128`` of a uint8 input shifted to int8
    -- cannot be cast to an unsigned type in TIR."""
    mask = tirx.const((1 << bits) - 1, "int32")
    out = None
    for d, v in enumerate(vals):
        e = (v.astype("int32") & mask).astype("uint32")
        e = e << tirx.const(bits * d, "uint32") if d else e
        out = e if out is None else out | e
    return out


def finish_int8(shape, acc_at, chan, corr, scale, requant, residual=None):
    """The kernel's output from its int32 sums: ``(acc - corr[o]) * scale[o]`` (float), or
    with ``requant = (lo, hi, dtype)`` the quantized next activation directly::

        q = round(clamp(acc * scale[o] + corr[o], lo, hi))      (``corr`` then a float offset)

    into which the requantize fold (:mod:`..rewrites.requant_fold`) folded bias, ReLU/Clip
    and the quantize step (:func:`round_clamp`). ``requant = (lo, hi, dtype, (a, b, c, lo2,
    hi2, dtype2))`` also adds the 8-bit tensor ``residual`` (:mod:`..rewrites.residual_fold`)."""
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
    magic = int(np.float32(_ROUND_MAGIC).view(np.int32))
    bits = tirx.reinterpret("int32", t + tirx.const(_ROUND_MAGIC, "float32"))
    return tirx.max(tirx.min(bits, tirx.const(magic + int(np.rint(hi)), "int32")),
                    tirx.const(magic + int(np.rint(lo)), "int32"))



def kernel_isa(sch, block, isa):
    """The ISA form an integer kernel block was built for (its annotation), else ``isa``."""
    built_for = sch.get(block).annotations.get(ISA_ATTR)  # the kernel's own form
    isa = ISAS[str(built_for)] if built_for is not None else isa
    if isa is None:
        raise ValueError("an int8 convolution needs the target's integer ISA")
    return isa
