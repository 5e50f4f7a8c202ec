"""Calibration activations for data-aware passes (lowrank, prune, quantize).

:func:`stream_activations` runs the model in onnxruntime over the calibration feeds in
batches and yields, per batch, the values of the requested intermediate tensors. Passes reduce
each batch as it comes (sample rows, accumulate covariances), so a large calibration set never
has to sit in memory as activations.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx



def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(m.graph.value_info) + list(m.graph.input)}
    for n in names:
        if n in known:
            continue
        vi = onnx.helper.make_empty_tensor_value_info(n)
        vi.type.tensor_type.elem_type = types.get(n, onnx.TensorProto.FLOAT)
        m.graph.output.append(vi)
        known.add(n)
    return m


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's static batch size when its first input's axis 0 is fixed, else None."""
    init = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
        return None
    return None


def calib_rows(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def stream_activations(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str],
                       batch: int = 32, limit: int | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: value}`` for each batch of ``feeds`` (rows on axis 0).

    A model with a fixed batch size is fed chunks of exactly that size; a short last chunk
    is padded by repeating its rows and the padding is cut off the results again.
    """
    import onnxruntime as ort

    names = list(dict.fromkeys(names))
    fb = fixed_batch(model)
    step = fb or batch
    n = calib_rows(feeds)
    if limit is not None:
        n = min(n, limit)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    inputs = {vi.name for vi in model.graph.input}
    run_names = [x for x in names if x not in inputs]  # graph inputs come from the feeds
    sess = None
    if run_names:
        sess = ort.InferenceSession(_with_outputs(model, run_names).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    for s in range(0, n, step):
        e = min(s + step, n)
        chunk = {k: v[s:e] for k, v in feeds.items()}
        short = e - s
        if fb and short < fb:
            idx = np.arange(fb) % short
            chunk = {k: v[idx] for k, v in chunk.items()}
        got = dict(zip(run_names, sess.run(run_names, chunk))) if sess else {}
        out = {x: (chunk[x] if x in inputs else got[x]) for x in names}
        if fb and short < fb:
            out = {k: (v[:short] if v.ndim and v.shape[0] == fb else v) for k, v in out.items()}
        yield out


def collect(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str],
            batch: int = 32, limit: int | None = None) -> dict[str, np.ndarray]:
    """All batches of :func:`stream_activations`, concatenated (for small models and tests)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for got in stream_activations(model, feeds, names, batch, limit):
        for k, v in got.items():
            parts[k].append(v)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items() if v}


def sample_patches(x: np.ndarray, kernel: tuple[int, int], strides, dils, pads,
                   out_hw: tuple[int, int], n_rows: int, rng) -> np.ndarray:
    """``n_rows`` im2col rows ``[rows, C, kh, kw]`` of a 2-D convolution over ``x`` (NCHW) at
    random output positions; ``pads`` = (top, left, bottom, right)."""
    N, C = x.shape[:2]
    kh, kw = kernel
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n = rng.integers(0, N, n_rows)
    p = rng.integers(0, out_hw[0], n_rows)
    q = rng.integers(0, out_hw[1], n_rows)
    ii = p[:, None] * strides[0] + np.arange(kh)[None, :] * dils[0]   # [rows, kh]
    jj = q[:, None] * strides[1] + np.arange(kw)[None, :] * dils[1]   # [rows, kw]
    got = xp[n[:, None, None, None], np.arange(C)[None, :, None, None],
             ii[:, None, :, None], jj[:, None, None, :]]
    return got.astype(np.float32)


def sample_rows(a: np.ndarray, n_rows: int, rng) -> np.ndarray:
    """Up to ``n_rows`` random rows of ``a`` viewed as [-1, features] (all if fewer)."""
    a = a.reshape(-1, a.shape[-1])
    idx = rng.integers(0, a.shape[0], n_rows) if a.shape[0] > n_rows else np.arange(a.shape[0])
    return a[idx].astype(np.float32)
