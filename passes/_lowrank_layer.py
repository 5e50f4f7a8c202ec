"""The lowrank pass's layer views: which Conv/Gemm/MatMul nodes can be factorized, their
weights as matrices, MAC and parameter counts per form, and their input rows sampled from
calibration data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import attr, provenance

from ._calib import sample_patches, sample_rows
from ._toolkit import chunking, rows_per_batch, stream_activations

PASS = "lowrank"


@dataclass
class Layer:
    node: onnx.NodeProto
    kind: str                 # "conv" | "gemm" | "matmul"
    W: np.ndarray             # conv: [K,C,kh,kw]; gemm/matmul: [out, in] (alpha folded)
    dtype: np.dtype
    x_shape: tuple            # input shape (conv: N,C,H,W)
    y_shape: tuple
    strides: tuple = (1, 1)
    dils: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    trans_a: int = 0
    beta: float = 1.0
    bias: str | None = None

    @property
    def out_pixels(self) -> int:
        """Output positions per sample that each apply the whole weight."""
        if self.kind == "conv":
            return int(np.prod(self.y_shape[2:]))
        return int(np.prod(self.y_shape[1:-1])) if self.kind == "matmul" else 1

    def macs(self) -> int:
        if self.kind == "conv":
            return self.out_pixels * int(np.prod(self.W.shape))
        return self.out_pixels * self.W.shape[0] * self.W.shape[1]

    def form_macs(self, form: str, r: int) -> int:
        if self.kind != "conv":
            return self.out_pixels * r * (self.W.shape[0] + self.W.shape[1])
        K, C, kh, kw = self.W.shape
        if form == "weight":
            return self.out_pixels * r * (C * kh * kw + K)
        h_out, w_out = self.y_shape[2], self.y_shape[3]
        w_in = self.x_shape[3]
        return h_out * w_in * r * C * kh + h_out * w_out * K * r * kw

    def form_params(self, form: str, r: int) -> int:
        if self.kind != "conv":
            return r * (self.W.shape[0] + self.W.shape[1])
        K, C, kh, kw = self.W.shape
        return r * (C * kh * kw + K) if form == "weight" else r * (C * kh + K * kw)

    def matrix(self, form: str) -> np.ndarray:
        W = self.W.astype(np.float64)
        if self.kind != "conv":
            return W
        K, C, kh, kw = W.shape
        if form == "weight":
            return W.reshape(K, -1)
        return W.transpose(1, 2, 0, 3).reshape(C * kh, K * kw)

    def forms(self, wanted: str) -> list[str]:
        if self.kind != "conv":
            return ["weight"]
        spatial_ok = self.W.ndim == 4 and self.W.shape[2] > 1 and self.W.shape[3] > 1
        if wanted == "spatial":
            return ["spatial"] if spatial_ok else []
        if wanted == "weight":
            return ["weight"]
        return ["weight", "spatial"] if spatial_ok else ["weight"]


def _explicit_pads(node, x_shape, W) -> tuple | None:
    kh, kw = W.shape[2:]
    s = list(attr(node, "strides", [1, 1]))
    d = list(attr(node, "dilations", [1, 1]))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = list(attr(node, "pads", [0, 0, 0, 0]))
        return (p[0], p[1], p[2], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    out = []
    for ax, k in ((0, kh), (1, kw)):
        n = x_shape[2 + ax]
        total = max((math.ceil(n / s[ax]) - 1) * s[ax] + (k - 1) * d[ax] + 1 - n, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def candidate(node, inits, shapes, config) -> tuple[Layer | None, str | None]:
    """The layer view of ``node``, or the reason it cannot be factorized."""
    if provenance(node).get("edgec.pass") == PASS:
        return None, "already factorized by lowrank"
    if config.include and node.name not in config.include:
        return None, "not in lowrank.include"
    if node.name in config.exclude:
        return None, "in lowrank.exclude"
    if node.op_type == "Conv":
        if not config.conv:
            return None, "conv factorization disabled (lowrank.conv=false)"
        if len(node.input) < 2 or node.input[1] not in inits:
            return None, "weight is not a constant"
        W = numpy_helper.to_array(inits[node.input[1]])
        if not np.all(np.isfinite(W)):
            return None, "weight holds NaN or infinity"
        if attr(node, "group", 1) != 1:
            return None, f"grouped/depthwise conv (group={attr(node, 'group', 1)}) is not " \
                         "factorized"
        if W.ndim != 4:
            return None, f"{W.ndim - 2}-D conv: only 2-D convs are factorized"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in inits:
            return None, "bias is not a constant"
        xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not xs or not ys or len(xs) != 4 or any(not d for d in xs[1:]) or \
                any(not d for d in ys[1:]):
            return None, "input/output shapes are not known"
        pads = _explicit_pads(node, xs, W)
        return Layer(node, "conv", W, W.dtype, xs, ys,
                     tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "dilations", [1, 1])),
                     pads, bias=bias), None
    if node.op_type in ("Gemm", "MatMul"):
        if not config.gemm:
            return None, "gemm factorization disabled (lowrank.gemm=false)"
        if len(node.input) < 2 or node.input[1] not in inits:
            return None, "second operand (the weight) is not a constant"
        if node.input[0] in inits:
            return None, "first operand is a constant too"
        B = numpy_helper.to_array(inits[node.input[1]])
        if np.issubdtype(B.dtype, np.floating) and not np.all(np.isfinite(B)):
            return None, "weight holds NaN or infinity"
        if B.ndim != 2:
            return None, f"weight has rank {B.ndim}: only 2-D weights are factorized"
        xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not ys or any(d is None for d in ys[1:]):
            return None, "output shape is not known"
        if node.op_type == "Gemm":
            alpha = float(attr(node, "alpha", 1.0))
            Wm = (B.T if attr(node, "transB", 0) else B).T * alpha  # [in, out] -> [out, in]
            Wm = Wm.astype(B.dtype)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias not in inits:
                return None, "bias C is not a constant"
            return Layer(node, "gemm", np.ascontiguousarray(Wm), B.dtype, xs or (), ys,
                         trans_a=int(attr(node, "transA", 0)),
                         beta=float(attr(node, "beta", 1.0)), bias=bias), None
        return Layer(node, "matmul", np.ascontiguousarray(B.T), B.dtype, xs or (), ys), None
    return None, None


def _sample_patches(x: np.ndarray, L: Layer, n_rows: int, rng) -> np.ndarray:
    return sample_patches(x, L.W.shape[2:], L.strides, L.dils, L.pads, L.y_shape[2:4],
                          n_rows, rng)


def _gemm_rows(x: np.ndarray, L: Layer, n_rows: int, rng) -> np.ndarray:
    return sample_rows(x.T if (L.kind == "gemm" and L.trans_a) else x, n_rows, rng)


def calibrate(model, layers: list[tuple[int, Layer]], calib, config, seed
               ) -> dict[str, np.ndarray]:
    """Input rows per layer, sampled over the calibration batches.

    The positions depend only on (seed, layer index, batch index), so a second capture from a
    rewritten model samples exactly the same positions (sequential reconstruction needs that).
    """
    total, batch = chunking(model, calib, config.calib_samples, 32)
    per = rows_per_batch(config.calib_rows, total, batch)
    parts: dict[str, list] = {L.node.name: [] for _, L in layers}
    names = [L.node.input[0] for _, L in layers]
    for bi, acts in enumerate(stream_activations(model, calib, names, batch=batch,
                                                 limit=total)):
        for li, L in layers:
            x = acts[L.node.input[0]]
            rng = np.random.default_rng([seed, li, bi])
            if L.kind == "conv":
                parts[L.node.name].append(_sample_patches(x, L, per, rng))
            else:
                parts[L.node.name].append(_gemm_rows(x, L, per, rng))
    return {k: np.concatenate(v)[: config.calib_rows] for k, v in parts.items() if v}
