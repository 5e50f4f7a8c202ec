"""Comparison statistics between a reference and a candidate run (Polygraphy-style)."""

from __future__ import annotations

import numpy as np


def output_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    """max/mean absolute error, max relative error, cosine similarity, error quantiles."""
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return {"shape_mismatch": [list(ref.shape), list(got.shape)], "max_abs": float("inf"),
                "cosine": 0.0}
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    if not np.all(np.isfinite(g)) and np.all(np.isfinite(r)):
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "cosine": 0.0,
                "nonfinite": int(np.sum(~np.isfinite(g)))}
    err = np.abs(r - g)
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cos = float(np.dot(r, g) / denom) if denom > 0 else (1.0 if np.allclose(r, g) else 0.0)
    rel = err / np.maximum(np.abs(r), 1e-12)
    return {
        "max_abs": float(err.max(initial=0.0)),
        "mean_abs": float(err.mean()) if err.size else 0.0,
        "p99_abs": float(np.quantile(err, 0.99)) if err.size else 0.0,
        "max_rel": float(rel.max(initial=0.0)),
        "cosine": cos,
        "ref_max_abs": float(np.abs(r).max(initial=0.0)),
    }


def within(ref: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> bool:
    return ref.shape == got.shape and bool(np.allclose(got, ref, rtol=rtol, atol=atol))


def top1(logits: np.ndarray) -> np.ndarray | None:
    """Class predictions from an [N, C] (or [N, C, 1, 1]) output; None for other shapes."""
    a = np.asarray(logits)
    if a.ndim > 2:
        a = a.reshape(a.shape[0], -1) if int(np.prod(a.shape[2:])) == 1 else None
    if a is None or a.ndim != 2 or a.shape[1] < 2:
        return None
    return a.argmax(axis=1)


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float | None:
    a, b = top1(ref), top1(got)
    if a is None or b is None or a.shape != b.shape:
        return None
    return float(np.mean(a == b))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    pred = top1(logits)
    labels = np.asarray(labels).reshape(-1)
    if pred is None or pred.shape[0] != labels.shape[0]:
        return None
    return float(np.mean(pred == labels))
