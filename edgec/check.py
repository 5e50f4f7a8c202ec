"""``edgec check``: accuracy regression of a compiled artifact against onnxruntime.

Three runs on the same data: the original model (onnxruntime, the reference), the rewritten
ONNX of the artifact (onnxruntime) and the compiled library (TVM). Per output: max/mean/p99
absolute error and cosine against the reference; for [N, C] outputs top-1 agreement; with a
``labels`` array, accuracy of reference and compiled and the drop in points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec.errors import EdgecError
from edgec.importer import load_model
from edgec.runtime import OrtSession, Session, load_npz, run_batched
from edgec.runtime.artifact import ONNX, read_manifest
from edgec.runtime.compare import accuracy, output_stats, top1_agreement


def check(model_path: str | Path, artifact: str | Path, data: dict[str, np.ndarray] | str,
          max_drop: float | None = None, min_cosine: float = 0.99, atol: float | None = None,
          rtol: float = 0.0, min_top1: float | None = None, limit: int | None = None,
          threads: int | None = None) -> dict:
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

    compiled = Session(artifact, num_threads=threads)
    got = run_batched(compiled, feeds, compiled.batch, names)

    result = {"samples": int(n), "target": manifest["target"], "outputs": {}, "rewritten": {},
              "compiled_vs_rewritten": {}}
    for name, r, w, g in zip(names, ref, rw, got):
        result["outputs"][name] = output_stats(r, g)
        result["rewritten"][name] = output_stats(r, w)
        result["compiled_vs_rewritten"][name] = output_stats(w, g)
    result["top1_agreement"] = top1_agreement(ref[0], got[0])
    acc = None
    if labels is not None:
        acc = {"reference": accuracy(ref[0], labels), "rewritten": accuracy(rw[0], labels),
               "compiled": accuracy(got[0], labels)}
        if acc["reference"] is None:
            raise EdgecError("labels given, but the first output is not [N, classes] logits")
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


def format_table(result: dict) -> str:
    lines = [f"edgec check: {result['samples']} samples, target {result['target']}",
             f"{'output':<20} {'run':<22} {'max_abs':>10} {'p99_abs':>10} {'cosine':>10}"]
    for name in result["outputs"]:
        for label, key in (("rewritten ONNX (ort)", "rewritten"),
                           ("compiled (tvm)", "outputs"),
                           ("compiled vs rewritten", "compiled_vs_rewritten")):
            st = result[key][name]
            lines.append(f"{name[:20]:<20} {label:<22} {st['max_abs']:>10.3g} "
                         f"{st.get('p99_abs', float('nan')):>10.3g} {st['cosine']:>10.6f}")
    if result["top1_agreement"] is not None:
        lines.append(f"top-1 agreement (compiled vs original): {result['top1_agreement']:.4f}")
    if result["accuracy"]:
        a = result["accuracy"]
        lines.append(f"accuracy: original {100 * a['reference']:.2f} %, rewritten "
                     f"{100 * a['rewritten']:.2f} %, compiled {100 * a['compiled']:.2f} % "
                     f"(drop {result['accuracy_drop']:.2f} points)")
    lines.append("OK" if result["ok"] else "FAILED: " + "; ".join(result["failures"]))
    return "\n".join(lines)
