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

