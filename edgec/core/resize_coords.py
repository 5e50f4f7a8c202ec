"""Resize's source coordinates, as onnxruntime computes them (numpy only).

The CPU resize kernel bakes these into constant tables, and the importer uses them to
lower a Resize whose ``scales`` input does not say what its output size says (see
:func:`edgec.core.importer.normalize`). Two forms, checked against onnxruntime 1.32:

- from the sizes alone (``scales`` is ``out / size``, or a ``sizes`` input): float32,
  ``x * size / out`` in that order for ``asymmetric`` and ``tf_half_pixel_for_nn``,
  ``(x + 0.5) / (out / size) - 0.5`` for the half-pixel modes. Dividing by the scale puts
  7 -> 2 output 1 at 3.4999998 instead of 3.5, multiplying by a precomputed ``size / out``
  puts 4 -> 14 output 10 at 2.5000002; either flips a nearest rounding. Over sizes 1..12 ->
  1..30, every mode and rounding, nearest and linear: no difference.
- from a given scale ``s`` whose ratio the output size does not keep (a 7-pixel axis at
  ``s = 1.5`` gives 10 pixels, ``10 / 7 != 1.5``): ``x / s`` (and ``(x + 0.5) / s - 0.5``).
  onnxruntime samples at the given scale; 15 of 2112 nearest cases over sizes 1..13 and
  twelve scales differ from it by one pixel where a coordinate lands within an ulp of a
  half (onnxruntime puts 9 / 1.2 at 7.5, float32 division at 7.4999995).

An axis whose scale is 1 maps each index to itself in every mode (onnxruntime copies it:
``tf_half_pixel_for_nn`` would otherwise shift it by half a pixel).
"""

from __future__ import annotations

import numpy as np

COORD_MODES = ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel",
               "tf_half_pixel_for_nn")
ROUNDING = ("round", "round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "")


def source_coords(size: int, out: int, mode: str, scale: float | None = None) -> np.ndarray:
    """The float32 source coordinate of each output index (``scale``: the Resize's own
    scale where it differs from ``out / size``; None: the sizes alone)."""
    f = np.float32
    x = np.arange(out, dtype=f)
    if scale is None and size == out or scale is not None and f(scale) == f(1):
        return x
    n, m = f(size), f(out)
    if scale is None:
        s = m / n
        div = (lambda v: v * n / m) if mode in ("asymmetric", "tf_half_pixel_for_nn") \
            else (lambda v: v / s)
    else:
        s = f(scale)
        div = (lambda v: v / s)  # noqa: E731
    if mode == "half_pixel":
        return div(x + f(0.5)) - f(0.5)
    if mode == "align_corners":
        return x * f(size - 1) / f(out - 1) if out > 1 else np.zeros(out, f)
    if mode == "asymmetric":
        return div(x)
    if mode == "pytorch_half_pixel":
        return div(x + f(0.5)) - f(0.5) if out > 1 else np.zeros(out, f)
    if mode == "tf_half_pixel_for_nn":
        return div(x + f(0.5))
    raise ValueError(f"coordinate_transformation_mode {mode!r}")


def nearest_index(size: int, out: int, mode: str, rounding: str,
                  scale: float | None = None) -> np.ndarray:
    """Source index per output index, nearest mode, clamped to the image."""
    f = np.float32
    if rounding == "":
        rounding = "round" if mode == "align_corners" else "floor"
    x = source_coords(size, out, mode, scale)
    idx = {"round": lambda v: np.sign(v) * np.floor(np.abs(v) + f(0.5)),  # half away from 0
           "round_prefer_floor": lambda v: np.ceil(v - f(0.5)),
           "round_prefer_ceil": lambda v: np.floor(v + f(0.5)),
           "floor": np.floor, "ceil": np.ceil}[rounding](x)
    return np.clip(idx, 0, size - 1).astype(np.int32)


def linear_taps(size: int, out: int, mode: str, scale: float | None = None):
    """``(i0, i1, a)``: the two source indices and the weight of the second, from the
    coordinate clamped to the image (onnxruntime's bilinear)."""
    x = np.clip(source_coords(size, out, mode, scale), 0, size - 1).astype(np.float32)
    lo = np.floor(x)
    a = (x - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    return lo.astype(np.int32), np.minimum(lo + 1, size - 1).astype(np.int32), a
