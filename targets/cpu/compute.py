"""TE helpers shared by the kernels' compute definitions."""

from __future__ import annotations

import tvm
from tvm import te


def ints(xs) -> list[int]:
    return [int(x) for x in xs]



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
