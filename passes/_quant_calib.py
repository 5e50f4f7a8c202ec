"""Quantization arithmetic for the quantize pass: weight scales and activation calibrators.

Everything here works on numpy arrays and histograms, so each calibrator can be checked
against a hand-computed case without building a graph.
"""

from __future__ import annotations

import numpy as np

BINS = 2048
INT32_MAX = 2 ** 31 - 1


# ----------------------------------------------------------------------------- weights

def _bshape(s: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape) if s.size > 1 else s.reshape(())


def weight_qmax(bits: int) -> int:
    """The symmetric integer range ``[-qmax, qmax]`` of ``bits``-bit weights (127, 63)."""
    return 2 ** (bits - 1) - 1


def weight_scales(w: np.ndarray, axis: int, method: str = "minmax",
                  per_channel: bool = True, grid: int = 100, qmax: int = 127) -> np.ndarray:
    """Symmetric scales ``s[k] = c_k / qmax``, one per slice along ``axis`` (or one);
    ``qmax`` = 127 for 8-bit weights, 63 for 7-bit ones.

    ``minmax``: ``c_k = max |W_k|``. ``mse``: ``c_k = f * max |W_k|`` with f on a grid in
    [0.3, 1] minimising ``sum (W_k - s_k * clamp(round(W_k / s_k), -qmax, qmax))^2`` -- clips
    a channel's outliers exactly where that lowers its error. An all-zero slice gets scale
    1/qmax (its weights quantize to 0 exactly either way)."""
    w = np.asarray(w, dtype=np.float64)
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
    amax = np.abs(wc).max(axis=1)
    if method == "mse":
        best = amax.copy()
        best_err = np.full(len(amax), np.inf)
        for f in np.linspace(1.0, 0.3, grid):
            c = np.maximum(amax * f, 1e-30)[:, None]
            s = c / qmax
            err = ((np.clip(np.round(wc / s), -qmax, qmax) * s - wc) ** 2).sum(axis=1)
            better = err < best_err * (1 - 1e-12)  # ties: the wider clip
            best[better], best_err[better] = (amax * f)[better], err[better]
        amax = best
    elif method != "minmax":
        raise ValueError(f"unknown weight method {method}")
    return np.where(amax > 0, amax, 1.0) / qmax


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int, qmax: int = 127
                    ) -> np.ndarray:
    s = _bshape(np.asarray(scales, np.float64), w.ndim, axis)
    return np.clip(np.round(np.asarray(w, np.float64) / s), -qmax, qmax).astype(np.int8)


def dequantize_weight(q: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    return q.astype(np.float64) * _bshape(np.asarray(scales, np.float64), q.ndim, axis)


# ----------------------------------------------------------------------------- activations

def qrange(dtype: str) -> tuple[int, int]:
    return (0, 255) if dtype == "uint8" else (-128, 127)


def scale_zero_point(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """Asymmetric ``(s, z)`` for the range ``[min(lo, 0), max(hi, 0)]`` (0 stays exact):
    ``s = (hi - lo) / (qmax - qmin)``, ``z = clamp(round(qmin - lo / s))``."""
    qmin, qmax = qrange(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    s = (hi - lo) / (qmax - qmin)
    z = int(np.clip(round(qmin - lo / s), qmin, qmax))
    return float(np.float32(s)), z


def fake_quant(x: np.ndarray, s: float, z: int, dtype: str) -> np.ndarray:
    """``s * (clamp(round(x / s) + z, qmin, qmax) - z)`` (round half to even, as ONNX)."""
    qmin, qmax = qrange(dtype)
    return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


class Observer:
    """One tensor's running min/max (first pass over the data), then a histogram on fixed
    edges [min(lo, 0), max(hi, 0)] (second pass), and per-channel means (axis 1)."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf
        self.hist: np.ndarray | None = None
        self.zeros = 0          # exact zeros (ReLU outputs): the quantizer keeps them exact
        self.count = 0
        self.chan_sum: np.ndarray | None = None

    def update_range(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(np.min(x)))
        self.hi = max(self.hi, float(np.max(x)))
        if x.ndim >= 2:
            s = x.astype(np.float64).sum(axis=tuple(i for i in range(x.ndim) if i != 1))
            n = x.size // x.shape[1]
            if self.chan_sum is None or self.chan_sum.shape != s.shape:
                self.chan_sum, self.count = s, n
            else:
                self.chan_sum, self.count = self.chan_sum + s, self.count + n

    def update_hist(self, x: np.ndarray) -> None:
        lo, hi = self.edges()
        h, _ = np.histogram(x, bins=BINS, range=(lo, hi))
        self.zeros += int(np.count_nonzero(x == 0))
        self.hist = h.astype(np.float64) if self.hist is None else self.hist + h

    def edges(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        return lo, hi

    def channel_mean(self) -> np.ndarray | None:
        return None if self.chan_sum is None else self.chan_sum / max(self.count, 1)


def _centers(lo: float, hi: float, n: int) -> np.ndarray:
    w = (hi - lo) / n
    return lo + w * (np.arange(n) + 0.5)


def range_percentile(hist, lo, hi, p) -> tuple[float, float]:
    """Clip at the p-th percentile on each side that has values (bin resolution, rounded
    outwards): the upper end is the right edge of the bin holding the p-th percentile."""
    c = np.cumsum(hist) / max(float(np.sum(hist)), 1e-30)
    edges = np.linspace(lo, hi, len(hist) + 1)
    a = edges[int(np.searchsorted(c, (100.0 - p) / 100.0, side="left"))] if lo < 0 else 0.0
    b = edges[min(int(np.searchsorted(c, p / 100.0, side="left")) + 1, len(hist))]
    return float(min(a, 0.0)), float(max(b, 0.0))


def _candidates(lo, hi, n):
    """Clip ranges ``[max(lo, -c), min(hi, c)]`` for thresholds c shrinking from max(|lo|, hi)
    to 1/n of it (symmetric thresholds, cut to the observed range; one-sided for one-signed
    tensors)."""
    amax = max(-lo, hi)
    return list(dict.fromkeys((max(lo, -c), min(hi, c))
                              for c in np.linspace(amax, amax / n, n)))


def quant_error(hist, lo, hi, a, b, dtype) -> float:
    """Expected squared error (rounding + clipping) of quantizing the histogram's values
    (at the bin centres) with the range [a, b]."""
    x = _centers(lo, hi, len(hist))
    s, z = scale_zero_point(a, b, dtype)
    return float(np.sum(hist * (x - fake_quant(x, s, z, dtype)) ** 2))


def range_mse(hist, lo, hi, dtype, n=100) -> tuple[float, float]:
    """The candidate range with the least expected squared quantization error (ties: the
    widest)."""
    return min(_candidates(lo, hi, n), key=lambda ab: quant_error(hist, lo, hi, *ab, dtype))


def kl_divergence(hist, lo, hi, a, b, levels=256) -> float:
    """KL(P || Q) of clipping to [a, b] (entropy calibration): P = the histogram
    restricted to the range with the outliers folded into its edge bins; Q = P merged into
    ``levels`` equal groups of bins, each group's mass spread evenly over the group's non-empty
    bins. Infinite when the range spans fewer than ``levels`` bins."""
    hist = np.asarray(hist, np.float64)
    edges = np.linspace(lo, hi, len(hist) + 1)
    i0 = int(np.clip(np.searchsorted(edges, a, side="right") - 1, 0, len(hist) - 1))
    i1 = int(np.clip(np.searchsorted(edges, b, side="left"), i0 + 1, len(hist)))
    if i1 - i0 < levels:
        return np.inf
    raw = hist[i0:i1]
    p = raw.copy()
    p[0] += hist[:i0].sum()
    p[-1] += hist[i1:].sum()
    q = np.zeros_like(p)
    for g in np.array_split(np.arange(len(p)), levels):
        nz = g[raw[g] > 0]
        if len(nz):
            q[nz] = raw[g].sum() / len(nz)
    mask = p > 0
    p = p / p.sum()
    q = q / max(q.sum(), 1e-30)
    q = np.where(mask & (q == 0), 1e-4 / len(q), q)  # smoothing: outliers folded into an
    q = q / q.sum()                                   # empty edge bin keep KL finite
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def range_entropy(hist, lo, hi, n=128) -> tuple[float, float]:
    """The candidate range with the least KL divergence (ties: the widest)."""
    return min(_candidates(lo, hi, n), key=lambda ab: kl_divergence(hist, lo, hi, *ab))


def activation_range(obs: Observer, method: str, percentile: float, dtype: str
                     ) -> tuple[float, float]:
    lo, hi = obs.edges()
    if method == "minmax" or obs.hist is None or obs.hist.sum() == 0:
        return lo, hi
    if method == "percentile":
        return range_percentile(obs.hist, lo, hi, percentile)
    if method == "mse":
        return range_mse(obs.hist, lo, hi, dtype)
    if method == "entropy":
        # exact zeros are exact after quantization too (z is exact): their spike would only
        # distort the KL of the bin group holding 0
        h = obs.hist.copy()
        i = min(int((0.0 - lo) / (hi - lo) * len(h)), len(h) - 1)
        h[i] = max(h[i] - obs.zeros, 0.0)
        return range_entropy(h, lo, hi) if h.sum() > 0 else (lo, hi)
    raise ValueError(f"unknown calibration method {method}")
