"""``edgec check``: accuracy regression of a compiled artifact against onnxruntime.

Three runs on the same data: the original model (onnxruntime, the reference), the rewritten
ONNX of the artifact (onnxruntime) and the compiled library (TVM). Per output: max/mean/p99
absolute error and cosine against the reference; for [N, C] outputs top-1 agreement; with a
``labels`` array, accuracy of reference and compiled and the drop in points.

A model with quantize/dequantize ops runs in onnxruntime with graph optimizations off: the
exact QDQ arithmetic, the same on every host. onnxruntime's optimized run (its fused int8
kernels, which sum u8 x s8 products in saturating 16-bit pairs on x86 CPUs without VNNI) is
run too and, where it differs from the exact result, reported on its own line -- a host
effect of onnxruntime, not an error of the compiled model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError
from edgec.core.importer import load_model
from edgec.runtime import OrtSession, load_npz, open_session, run_batched, where
from edgec.runtime.artifact import ONNX, read_manifest
from edgec.runtime.compare import accuracy, output_stats, top1, top1_agreement


def check(model_path: str | Path, artifact: str | Path, data: dict[str, np.ndarray] | str,
          max_drop: float | None = None, min_cosine: float = 0.99, atol: float | None = None,
          rtol: float = 0.0, min_top1: float | None = None, limit: int | None = None,
          threads: int | None = None, output: str | None = None,
          board: dict | None = None) -> dict:
    """``output``: the output scored for top-1 and accuracy (default: the first);
    ``board``: ``{"rpc": HOST:PORT, "key": KEY}`` runs the compiled model on a board
    registered with TVM's RPC tracker (the references still run here)."""
    manifest = read_manifest(artifact)
    if isinstance(data, (str, Path)):
        data = load_npz(data)
    labels = data.get("labels")
    feeds = {k: v for k, v in data.items() if k != "labels"}
    if not feeds:
        raise EdgecError("the data file holds no input arrays")
    if limit:
        feeds = {k: v[:limit] for k, v in feeds.items()}
        labels = labels[:limit] if labels is not None else None
    names = [o["name"] for o in manifest["outputs"]]
    if output is not None and output not in names:
        raise EdgecError(f"--output '{output}' is not an output of the artifact "
                         f"({', '.join(names)})")
    scored = output if output is not None else names[0]
    si = names.index(scored)

    source = load_model(model_path)
    ref_sess = OrtSession(source, num_threads=threads)
    if set(ref_sess.input_names) != set(feeds):
        raise EdgecError(f"data arrays {sorted(feeds)} do not match the model inputs "
                         f"{sorted(ref_sess.input_names)}")
    n = next(iter(feeds.values())).shape[0]
    if labels is not None and len(labels) != n:
        raise EdgecError(f"labels has {len(labels)} rows, the inputs {n}")
    # The original may have a fixed batch different from the data's: run it in its own batch.
    ref_batch = ref_sess.input_specs[0]["shape"][0] if ref_sess.input_specs[0]["shape"] else None
    ref = run_batched(ref_sess, feeds, ref_batch if isinstance(ref_batch, int) else None, names)

    rewritten = OrtSession(Path(artifact) / ONNX, num_threads=threads)
    rw_batch = rewritten.input_specs[0]["shape"][0] if rewritten.input_specs[0]["shape"] else None
    rw = run_batched(rewritten, feeds, rw_batch if isinstance(rw_batch, int) else None, names)

    host = None
    if not rewritten.optimized:  # a QDQ model: the reference above is the exact arithmetic
        host = run_batched(OrtSession(Path(artifact) / ONNX, num_threads=threads,
                                      optimize=True), feeds,
                           rw_batch if isinstance(rw_batch, int) else None, names)

    compiled = open_session(artifact, num_threads=threads, **(board or {}))
    got = run_batched(compiled, feeds, compiled.batch, names)

    result = {"samples": int(n), "target": manifest["target"], "compiled_on": where(compiled),
              "outputs": {}, "rewritten": {}, "compiled_vs_rewritten": {}}
    for name, r, w, g in zip(names, ref, rw, got):
        result["outputs"][name] = output_stats(r, g)
        result["rewritten"][name] = output_stats(r, w)
        result["compiled_vs_rewritten"][name] = output_stats(w, g)
    result["scored_output"] = scored
    result["top1_agreement"] = top1_agreement(ref[si], got[si])
    result["onnxruntime_host"] = None if host is None else _host_effect(rw, host, names, labels, si)
    acc = None
    if labels is not None:
        _check_class_scores(scored, ref[si], labels, len(names) > 1 and output is None)
        acc = {"reference": accuracy(ref[si], labels), "rewritten": accuracy(rw[si], labels),
               "compiled": accuracy(got[si], labels)}
        result["accuracy"] = acc
        result["accuracy_drop"] = 100.0 * (acc["reference"] - acc["compiled"])
    else:
        result["accuracy"] = None
        result["accuracy_drop"] = None

    failures = []
    for name, st in result["outputs"].items():
        if st["cosine"] < min_cosine:
            failures.append(f"{name}: cosine {st['cosine']:.6f} < {min_cosine}")
        if atol is not None:
            r = ref[names.index(name)]
            g = got[names.index(name)]
            if not np.allclose(g, r, atol=atol, rtol=rtol):
                failures.append(f"{name}: max_abs {st['max_abs']:.3g} beyond atol={atol} "
                                f"rtol={rtol}")
    if min_top1 is not None and result["top1_agreement"] is not None and \
            result["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_top1}")
    if max_drop is not None:
        if result["accuracy_drop"] is None:
            failures.append("--max-drop needs a 'labels' array in the data")
        elif result["accuracy_drop"] > max_drop:
            failures.append(f"accuracy drop {result['accuracy_drop']:.2f} points > {max_drop}")
    result["failures"] = failures
    result["ok"] = not failures
    return result


def _check_class_scores(name: str, scores: np.ndarray, labels: np.ndarray,
                        guessed: bool) -> None:
    """Accuracy only on an [N, classes] output whose class count covers every label."""
    hint = " (name the class-score output with --output)" if guessed else ""
    shape = list(np.shape(scores))
    if top1(scores) is None:
        raise EdgecError(f"labels given, but output '{name}' {shape} is not [N, classes] "
                         f"scores{hint}")
    labels = np.asarray(labels).reshape(-1)
    classes = shape[1]
    if labels.dtype.kind not in "iub" and not (
            labels.dtype.kind == "f" and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))):
        raise EdgecError(f"labels must be integer class indices (got {labels.dtype})")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise EdgecError(f"labels range over [{labels.min():g}, {labels.max():g}], output "
                         f"'{name}' scores {classes} classes{hint}")


def _host_effect(exact, host, names, labels, scored: int = 0) -> dict:
    """How onnxruntime's optimized run of a QDQ model on this host differs from the exact QDQ
    arithmetic: per-output statistics, top-1 agreement and accuracies of the ``scored``
    output, and whether it matters (outputs off by more than float rounding at a few ties)."""
    stats = {n: output_stats(e, h) for n, e, h in zip(names, exact, host)}
    out = {"outputs": stats, "top1_agreement": top1_agreement(exact[scored], host[scored])}
    if labels is not None:
        out["accuracy_exact"] = accuracy(exact[scored], labels)
        out["accuracy_host"] = accuracy(host[scored], labels)
    agree = out["top1_agreement"]
    out["differs"] = bool(
        any(st["cosine"] < 0.9999 for st in stats.values()) or
        (agree is not None and agree < 0.999) or
        (labels is not None and out["accuracy_exact"] is not None and
         abs(out["accuracy_exact"] - out["accuracy_host"]) >= 0.001))
    return out


def host_line(h: dict) -> str:
    """One line on onnxruntime's optimized run of a QDQ model on this host."""
    parts = []
    worst = min(h["outputs"].items(), key=lambda kv: kv[1]["cosine"])
    parts.append(f"output '{worst[0]}' cosine {worst[1]['cosine']:.5f}, "
                 f"max_abs {worst[1]['max_abs']:.3g}")
    if h["top1_agreement"] is not None:
        parts.append(f"top-1 agreement {h['top1_agreement']:.4f}")
    if h.get("accuracy_host") is not None:
        parts.append(f"accuracy {100 * h['accuracy_host']:.2f} % against exact "
                     f"{100 * h['accuracy_exact']:.2f} %")
    return ("note: onnxruntime's optimized int8 kernels on this host differ from exact QDQ "
            "arithmetic (" + "; ".join(parts) + "): they sum u8 x s8 products in saturating "
            "16-bit pairs on x86 CPUs without VNNI; the rewritten reference above is exact "
            "(graph optimizations off), and `quantize weight_bits=7` avoids the saturation")


def format_table(result: dict) -> str:
    lines = [f"edgec check: {result['samples']} samples, target {result['target']}"
             + (f", compiled model run on the {result['compiled_on']}"
                if result.get("compiled_on", "here") != "here" else ""),
             f"{'output':<20} {'run':<22} {'max_abs':>10} {'p99_abs':>10} {'cosine':>10}"]
    for name in result["outputs"]:
        for label, key in (("rewritten ONNX (ort)", "rewritten"),
                           ("compiled (tvm)", "outputs"),
                           ("compiled vs rewritten", "compiled_vs_rewritten")):
            st = result[key][name]
            if key == "rewritten" and result.get("onnxruntime_host") is not None:
                label = "rewritten, exact QDQ"
            lines.append(f"{name[:20]:<20} {label:<22} {st['max_abs']:>10.3g} "
                         f"{st.get('p99_abs', float('nan')):>10.3g} {st['cosine']:>10.6f}")
    scored = f" of output '{result['scored_output']}'" if "scored_output" in result and \
        len(result["outputs"]) > 1 else ""
    if result["top1_agreement"] is not None:
        lines.append(f"top-1 agreement{scored} (compiled vs original): "
                     f"{result['top1_agreement']:.4f}")
    if result["accuracy"]:
        a = result["accuracy"]
        lines.append(f"accuracy{scored}: original {100 * a['reference']:.2f} %, rewritten "
                     f"{100 * a['rewritten']:.2f} %, compiled {100 * a['compiled']:.2f} % "
                     f"(drop {result['accuracy_drop']:.2f} points)")
    host = result.get("onnxruntime_host")
    if host and host["differs"]:
        lines.append(host_line(host))
    lines.append("OK" if result["ok"] else "FAILED: " + "; ".join(result["failures"]))
    return "\n".join(lines)
