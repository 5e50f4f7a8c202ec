"""TE helpers shared by the kernels' compute definitions."""

from __future__ import annotations

import tvm
from tvm import te


def ints(xs) -> list[int]:
    return [int(x) for x in xs]


# exp(r) on |r| <= ln(2) / 2, degree 5, p(0) = 1, fitted for the least relative error
# (1.0e-7 with float32 coefficients); ln 2 split in two so that r = v - n ln 2 keeps v's bits
_EXP_POLY = (1.0, 0.9999997019767761, 0.4999915063381195, 0.16667599976062775,
             0.04189792275428772, 0.008292494341731071)
_LN2_HI, _LN2_LO = 0.693145751953125, 1.4286068203094173e-06


def fast_exp(v):
    """``exp(v)`` of a float32 expression as plain TIR arithmetic, so it vectorizes (the
    sigmoid of SiLU epilogues, TE or TVMScript alike)::

        n = round(v / ln 2),  r = v - n ln 2 (|r| <= ln 2 / 2),  exp(v) = 2^n p(r)

    with ``p`` a degree-5 polynomial (Horner, 5 FMAs) and ``2^n`` built in the exponent
    bits, ``v`` clamped to [-87, 88] first. Within 2.5e-7 relative of exp (TOPI's
    ``fast_exp``, degree 7 after ``floor(v / ln 2 + 1/2)``: 1.6e-7), in about two thirds
    of its time (a SiLU over a vector in L1: 8.3 against 12.3 cycles for 16 lanes on
    AVX-512, 5.7 against 8.4 for 8 on AVX2). ``max(., v)`` at the end keeps NaN (which the
    clamps replace) and +inf."""
    f32 = "float32"
    vc = tvm.tirx.max(tvm.tirx.min(v, tvm.tirx.const(88.0, f32)), tvm.tirx.const(-87.0, f32))
    n = tvm.tirx.round(vc * tvm.tirx.const(1.4426950408889634, f32))
    r = vc - n * tvm.tirx.const(_LN2_HI, f32) - n * tvm.tirx.const(_LN2_LO, f32)
    p = tvm.tirx.const(_EXP_POLY[-1], f32)
    for c in reversed(_EXP_POLY[:-1]):
        p = p * r + tvm.tirx.const(c, f32)
    two_n = tvm.tirx.reinterpret(f32, tvm.tirx.shift_left(n.astype("int32") + 127, 23))
    return tvm.tirx.max(two_n * p, v)


def fast_sigmoid(v):
    """``1 / (1 + exp(-v))`` of a float32 expression with :func:`fast_exp` (the legalized
    Sigmoid and the fused kernels' SiLU epilogues)."""
    one = tvm.tirx.const(1.0, "float32")
    return one / (one + fast_exp(-v))



def conv_out(size: int, pad_a: int, pad_b: int, k: int, stride: int, dil: int) -> int:
    """Output extent of a convolution along one axis."""
    return (size + pad_a + pad_b - (k - 1) * dil - 1) // stride + 1


def pad_likely(x, pads, load=None):
    """Zero padding whose bounds test is marked ``likely``, so TIR's LoopPartition
    splits off an interior that copies without tests (topi.nn.pad does not mark it).
    ``load(n, c, y, x)`` (default ``x[n, c, y, x]``) reads one float input value, e.g.
    dequantizing an 8-bit input."""
    pt, pl, pb, pr = pads
    if not any(pads) and load is None:
        return x
    load = load or (lambda *i: x[i])
    nb, c, h, w = ints(x.shape)

    def body(n, c_, y, xx):
        inside = tvm.tirx.all(y >= pt, y < h + pt, xx >= pl, xx < w + pl)
        return tvm.tirx.if_then_else(tvm.tirx.likely(inside), load(n, c_, y - pt, xx - pl),
                                     tvm.tirx.const(0.0, "float32"))

    return te.compute((nb, c, h + pt + pb, w + pl + pr), body, name="edgec_pad")


def column_phases(x, kh: int, kw: int, strides, pads, dil, owp: int, fill, load=None):
    """The padded input of a convolution or pool split by column phase, so that every tap
    of a strided window reads contiguous columns::

        Xs_p[n, c, y, j] = Xpad[n, c, y, j * sw + p]      (one buffer per phase p used)

    tap ``k`` of output column ``x`` is ``Xs_{(k*dw) % sw}[.., x + (k*dw) // sw]``
    (:func:`column_tap`).
    ``owp``: the output columns computed (rows padded to whole vectors); ``fill``: the
    padding value; ``load(n, c, y, x)`` (default ``x[n, c, y, x]``) reads one input value.
    Returns ``{p: Xs_p}``. The bounds tests are ``likely`` (one per test that can fail), so
    LoopPartition splits off an interior that copies without them."""
    nb, c, h, w = ints(x.shape)
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, _, _ = pads
    oh = conv_out(h, pt, pads[2], kh, sh, dh)
    cols = owp + ((kw - 1) * dw) // sw
    rows = (oh - 1) * sh + (kh - 1) * dh + 1
    load = load or (lambda *i: x[i])

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
    return {p: te.compute((nb, c, rows, cols), phase(p), name=f"edgec_pad_p{p}")
            for p in sorted({(k * dw) % sw for k in range(kw)})}


def column_tap(xs, sw: int, dw: int, k, n, c, row, x, kw: int = 0):
    """Tap ``k`` of output column ``x`` in input row ``row``, read from
    :func:`column_phases`' buffers ``xs``. ``k`` is a constant, or a loop variable over
    ``kw`` taps that is unrolled: with a stride, a select over the taps, each reading its
    own phase at a constant offset. After unrolling it folds to the one tap, so that every
    tap is its own multiply-add into the accumulator: a sum of the taps written out and
    added to it once cannot be reassociated (float), costs a multiply and an add more per
    kernel row and, in the stem's 14-accumulator tile, spilled registers (SqueezeNet's
    3x3/2 stem: 3x slower)."""
    if isinstance(k, int) or sw == 1:  # one phase: the taps are offsets in it
        return xs[(k * dw) % sw][n, c, row, x + (k * dw) // sw]
    k = getattr(k, "var", k)
    out = column_tap(xs, sw, dw, kw - 1, n, c, row, x)
    for j in reversed(range(kw - 1)):
        out = tvm.tirx.Select(k == j, column_tap(xs, sw, dw, j, n, c, row, x), out)
    return out
