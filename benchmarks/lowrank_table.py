"""The lowrank pass on real data and its latency effect.

    python benchmarks/lowrank_table.py [--calib 2000] [--skip-resnet] [--threads 2]
                                       [--repeat 20] [--json FILE]

1. Trained Fashion-MNIST CNN (models/fashion_mnist_cnn.onnx): calibration = the first
   ``--calib`` *training* images, evaluation = all 10 000 test images in onnxruntime. Rows
   over rank criteria (the seed's sigma threshold, energy, model MAC budgets), data-free and
   data-aware (--calib: reduced-rank regression on real activations, sequential refit).
   Columns: conv+gemm MACs, reduction, parameters, test accuracy, drop in points.
2. The headline configuration compiled by TVM and checked with ``edgec check`` against the
   labels (the compiled artifact, not onnxruntime).
3. ResNet-18 (random weights, seeded): compiled as is and factorized at a MAC budget, both
   benchmarked against onnxruntime on the original model in the same run (``edgec bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _fashion import accuracy, setup  # noqa: E402 - (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"model_mac_ratio": "0.4"}


def fashion_table(n_calib: int) -> tuple[list[dict], dict]:
    from edgec.driver.pipeline import Pipeline

    model, xt, yt, xc = setup(n_calib)
    base_acc = accuracy(model, xt, yt)
    from edgec.core.stats import model_stats

    base = model_stats(model)
    extra: dict = {"base_accuracy": base_acc}
    rows = [{"criterion": "original", "mode": "-", "macs": base.macs // 500,
             "params": base.params, "accuracy": base_acc, "seconds": 0.0}]
    grid = ([{"sigma_threshold": v} for v in ("0.05", "0.1", "0.2")]
            + [{"energy": v} for v in ("0.99", "0.995")]
            + [{"model_mac_ratio": v} for v in ("0.7", "0.5", "0.4", "0.3")])
    for sets in grid:
        for mode, calib in (("data-free", None), ("data-aware", {"input": xc})):
            t0 = time.perf_counter()
            res = Pipeline(["lowrank"], {"lowrank": dict(sets, calib_samples=str(n_calib))},
                           calib=calib).run(model)
            secs = time.perf_counter() - t0
            st = model_stats(res.model)
            layers = res.reports[0].details["layers"]
            if calib is not None and "spectra" not in extra:
                extra["spectra"] = {r["node"]: r["rank_fraction_for_99pct_energy"]
                                    for r in layers if "rank_fraction_for_99pct_energy" in r}
            rows.append({"criterion": ", ".join(f"{k}={v}" for k, v in sets.items()),
                         "mode": mode, "macs": st.macs // 500, "params": st.params,
                         "accuracy": accuracy(res.model, xt, yt), "seconds": secs,
                         "ranks": {r["node"]: (r.get("form"), r.get("rank")) for r in layers
                                   if "skipped" not in r}})
            print(_row(rows[-1], rows[0]), flush=True)
    print("\nfraction of the full rank that holds 99 % of the energy (the seed's figures 11/12):")
    for node, fr in extra.get("spectra", {}).items():
        print(f"  {node:<12} weight matrix {fr['weight']:.2f}   im2col image matrix "
              f"{fr.get('image', float('nan')):.2f}")
    return rows, extra


def _row(r: dict, base: dict) -> str:
    red = base["macs"] / max(r["macs"], 1)
    drop = (base["accuracy"] - r["accuracy"]) * 100
    return (f"| {r['criterion']:<22} | {r['mode']:<10} | {r['macs'] / 1e6:7.2f} M | {red:5.2f}x "
            f"| {r['params'] / 1e3:7.1f} K | {r['accuracy'] * 100:6.2f} % | {drop:+6.2f} |")


def headline_check(n_calib: int, tmp: Path) -> dict:
    from edgec.driver.check import check
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import fashion_mnist

    xc, _ = fashion_mnist.load("train", n_calib)
    xt, yt = fashion_mnist.load("test")
    src = ROOT / "models" / "fashion_mnist_cnn.onnx"
    out = tmp / "fashion-lowrank"
    rep = compile_model(src, out, CompileOptions(
        target="x86", passes=["lowrank"], input_shapes={"input": (100, 1, 28, 28)},
        sets=[f"lowrank.{k}={v}" for k, v in HEADLINE.items()], calib={"input": xc},
        progress=False))
    res = check(src, out, {"input": xt, "labels": yt}, max_drop=1.0)
    return {"macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
            "plots": rep["plots"], "check": res}


def resnet_latency(threads: int, repeat: int, tmp: Path, budget: str) -> dict:
    from edgec.driver.bench import bench
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import zoo

    src = tmp / "resnet18.onnx"
    zoo.export("resnet18", src, seed=0, batch=1)
    out = {}
    for label, passes, sets in (("original", None, []),
                                ("lowrank", ["lowrank"], [f"lowrank.model_mac_ratio={budget}",
                                                          "lowrank.round_to=16"])):
        art = tmp / f"resnet18-{label}"
        rep = compile_model(src, art, CompileOptions(target="x86", passes=passes, sets=sets,
                                                     use_tuning_db=False, progress=False))
        r = bench(src, art, threads=threads, repeat=repeat, peak=False)
        out[label] = {"macs": rep["after"]["macs"], "ort_ms": r["onnxruntime_ms"],
                      "edgec_ms": r["edgec_ms"], "ratio": r["ratio"]}
        print(f"resnet18 {label:<9} MACs {rep['after']['macs'] / 1e9:.3f} G  onnxruntime "
              f"{r['onnxruntime_ms']:.2f} ms  edgec {r['edgec_ms']:.2f} ms  ratio {r['ratio']:.2f}",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=2000)
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--budget", default="0.5", help="ResNet-18 model_mac_ratio")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args(argv)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDGEC_CACHE"] = str(tmp / "cache")
        if not a.skip_fashion:
            print("| criterion              | mode       | MACs/img  | fewer | params    | "
                  "test acc | drop pt |")
            print("|---|---|---|---|---|---|---|")
            rows, extra = fashion_table(a.calib)
            result["fashion"] = {"rows": rows, **extra}
            h = headline_check(a.calib, tmp)
            result["fashion_compiled"] = h
            acc = h["check"]["accuracy"]
            print(f"\ncompiled (TVM, x86) {HEADLINE}: MACs {h['macs_before'] / 1e6:.1f} M -> "
                  f"{h['macs_after'] / 1e6:.1f} M per batch of 100; edgec check on 10000 test "
                  f"images: original {100 * acc['reference']:.2f} %, compiled "
                  f"{100 * acc['compiled']:.2f} %, drop {h['check']['accuracy_drop']:.2f} "
                  f"points, ok={h['check']['ok']}")
        if not a.skip_resnet:
            result["resnet18"] = resnet_latency(a.threads, a.repeat, tmp, a.budget)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    from _results import main_recorded

    sys.exit(main_recorded("lowrank_table", "lowrank on the trained Fashion-MNIST CNN", main))
