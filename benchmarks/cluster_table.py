"""The cluster and template passes on the trained Fashion-MNIST CNN: test accuracy, codebook
size and the share of multiplies a reuse-lookup kernel still does.

    python benchmarks/cluster_table.py [--calib 2000] [--json FILE] [--no-record]

Calibration = the first ``--calib`` training images (the passes use up to their
``calib_samples``); evaluation = all 10 000 test images in onnxruntime. The model is
normalized first as ``edgec compile`` does (BatchNorm folded into the convs). No retraining.

* cluster: bits 1..4 (and ternary), one codebook per layer over every Conv/Gemm (the first
  conv included), plain k-means (no --calib) and data-aware: H-weighted k-means +
  least-squares codebook refit on the original model's inputs ("one shot":
  ``sequential=false, refit_bias=false``), or layer by layer on the clustered model's inputs
  with the bias refit (the default). "distinct products" = distinct (weight value, input
  element) pairs per image over all clustered layers, as a fraction of their multiplies (the
  reuse-lookup kernel's multiplies).
* template: the first conv (32 filters, 1 input channel), ``count`` filters replaced by HLAC
  or LBC templates, with the reader (/3/Conv) refitted on the calibration images.
* The seed's metric for layer 1 (SEEDS.md 002): distinct (weight value, input *value*) pairs,
  i.e. multiplies memoized on the 8-bit pixel values, per test image (mean over 100), as a
  fraction of the layer's multiplies; template taps cost none, their scale one per output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _fashion import accuracy, setup  # noqa: E402 - (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def first_conv(model) -> tuple[np.ndarray, np.ndarray]:
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    n = next(n for n in model.graph.node if n.op_type == "Conv")
    return inits[n.input[1]], n


def seed_metric(W: np.ndarray, images: np.ndarray, template_filters=()) -> float:
    """Mean over images of distinct (weight value, input value) pairs / multiplies for a
    3x3 pad-1 conv on one channel; ``template_filters`` multiply only by their scale, once
    per output."""
    K = W.shape[0]
    H, Wd = images.shape[-2:]
    dense = K * 9 * H * Wd
    learned = [k for k in range(K) if k not in set(template_filters)]
    fracs = []
    for img in images:
        x = img.reshape(H, Wd)
        xp = np.pad(x, 1, constant_values=np.nan)
        sets = {}
        for ky in range(3):
            for kx in range(3):
                v = xp[ky:ky + H, kx:kx + Wd]
                sets[(ky, kx)] = set(np.unique(v[np.isfinite(v) & (v != 0)]).tolist())
        by_w: dict[float, set] = {}
        for k in learned:
            for ky in range(3):
                for kx in range(3):
                    w = float(W[k, 0, ky, kx])
                    if w != 0:
                        by_w.setdefault(w, set()).update(sets[(ky, kx)])
        pairs = sum(len(s) for s in by_w.values()) + len(template_filters) * H * Wd
        fracs.append(pairs / dense)
    return float(np.mean(fracs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=2000)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from edgec.driver.pipeline import Pipeline

    model, xt, yt, xc = setup(a.calib)
    base = accuracy(model, xt, yt)
    imgs = xt[:100]
    W0, _ = first_conv(model)
    print(f"dense model: {100 * base:.2f} % on the 10 000 test images; calibration: the first "
          f"{a.calib} training images\n")
    out = {"base": base, "cluster": [], "template": []}

    print("## cluster (one codebook per layer, all 6 Conv/Gemm layers)\n")
    print("| bits | method | distinct values/layer | test acc | drop pt | distinct products "
          "(all layers) | layer 1, seed metric | s |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in ("1", "2", "3", "4", "ternary"):
        for data, seq in ((False, False), (True, False), (True, True)):
            sets = {"ternary": "true"} if bits == "ternary" else {"bits": bits}
            if data and not seq:
                sets.update(sequential="false", refit_bias="false")
            t0 = time.perf_counter()
            res = Pipeline(["cluster"], {"cluster": sets},
                           calib={"input": xc} if data else None).run(model)
            rep = res.reports[0]
            acc = accuracy(res.model, xt, yt)
            W1, _ = first_conv(res.model)
            r = {"bits": bits, "data_aware": data, "sequential": seq, "accuracy": acc,
                 "drop": 100 * (base - acc),
                 "distinct_products_fraction": rep.details["distinct_products_fraction"],
                 "seed_metric_layer1": seed_metric(W1, imgs),
                 "values": max(x["distinct_values"] for x in rep.details["layers"]),
                 "layers": {x["node"]: {k: x.get(k) for k in
                                        ("distinct_values", "weight_error", "output_error_kmeans",
                                         "output_error_refit", "distinct_products_fraction")}
                            for x in rep.details["layers"]},
                 "seconds": time.perf_counter() - t0}
            out["cluster"].append(r)
            how = ("data-aware, sequential + bias" if seq else "data-aware, one shot") if data \
                else "k-means"
            print(f"| {bits} | {how} | {r['values']} | "
                  f"{100 * acc:.2f} % | {r['drop']:+.2f} | "
                  f"{100 * r['distinct_products_fraction']:.2f} % | "
                  f"{100 * r['seed_metric_layer1']:.2f} % | {r['seconds']:.0f} |", flush=True)

    print("\n## template on the first conv (/0/Conv: 32 filters 1x3x3, reader /3/Conv refitted)"
          "\n")
    print("| bank | count | calib | filters replaced | test acc | drop pt | reader err before "
          "-> after refit | params | multiplies | distinct products | layer 1, seed metric |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("hlac", None, False), ("hlac", None, True), ("hlac", "8", True),
            ("hlac", "16", True), ("hlac", "25", True), ("hlac", "25", False),
            ("lbc", "25", True)]
    for bank, count, data in rows:
        sets = {"bank": bank}
        if count:
            sets["count"] = count
        res = Pipeline(["template"], {"template": sets},
                       calib={"input": xc} if data else None).run(model)
        rep = res.reports[0]
        acc = accuracy(res.model, xt, yt)
        lay = rep.details["layers"][0] if rep.details["layers"] else {}
        rec = [x for x in rep.details["reconstruction"] if "held_out_error_before" in x]
        recs = ", ".join(f"{x['held_out_error_before']:.3f} -> {x['held_out_error_after']:.3f}"
                         for x in rec) or "-"
        tf = [x["filter"] for x in lay.get("replaced", [])]
        W1, _ = first_conv(res.model)
        r = {"bank": bank, "count": count, "calib": data, "accuracy": acc,
             "drop": 100 * (base - acc), "replaced": lay.get("filters_replaced", 0),
             "reconstruction": rec, "seed_metric_layer1": seed_metric(W1, imgs, tf),
             **{k: lay.get(k) for k in ("trainable_params_before", "trainable_params_after",
                                        "trainable_params_after_without_scales",
                                        "multiplies_fraction", "distinct_products_fraction",
                                        "mean_filter_error", "layer_output_error")}}
        out["template"].append(r)
        print(f"| {bank} | {count or 'max_error'} | {'yes' if data else 'no'} | "
              f"{r['replaced']}/32 | {100 * acc:.2f} % | {r['drop']:+.2f} | {recs} | "
              f"{r['trainable_params_before']} -> {r['trainable_params_after']} "
              f"({r['trainable_params_after_without_scales']} w/o scales) | "
              f"{100 * (r['multiplies_fraction'] or 0):.1f} % | "
              f"{100 * (r['distinct_products_fraction'] or 0):.1f} % | "
              f"{100 * r['seed_metric_layer1']:.2f} % |", flush=True)
    print(f"\nLayer 1 dense (fp32), seed metric: {100 * seed_metric(W0, imgs):.2f} % of its "
          "multiplies (the seed: 19 % in fp32, 4.4 % with templates on CIFAR-10).")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from _results import main_recorded

    sys.exit(main_recorded("cluster_table", "cluster and template on the trained "
                           "Fashion-MNIST CNN", main))
