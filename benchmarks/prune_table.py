"""The prune pass on real data and its latency effect.

    python benchmarks/prune_table.py [--calib 2000] [--skip-zoo] [--threads 2] [--repeat 20]
                                     [--json FILE]

1. Trained Fashion-MNIST CNN: calibration = the first ``--calib`` training images (the pass
   uses ``prune.calib_samples``, default 512, of them), evaluation =
   all 10 000 test images in onnxruntime. Rows over alpha (PCA) and ratio, with and without
   least-squares reconstruction: conv+gemm MACs, reduction, parameters, accuracy, drop.
2. The headline configuration composed with lowrank (``--passes prune,lowrank``), compiled by
   TVM and checked with ``edgec check`` against the labels.
3. ResNet-18 and MobileNetV2 (random weights, seeded; calibration = seeded noise): pruned at
   a ratio, compiled, and benchmarked against onnxruntime on the original model.
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
HEADLINE = {"alpha": "0.995"}


def _row(r: dict, base: dict) -> str:
    fewer = 1 - r["macs"] / base["macs"]
    drop = (base["accuracy"] - r["accuracy"]) * 100
    return (f"| {r['criterion']:<12} | {r['reconstruct']:<5} | {r['macs'] / 1e6:6.2f} M | "
            f"{fewer * 100:5.1f} % | {r['params'] / 1e3:6.1f} K | {r['accuracy'] * 100:6.2f} % | "
            f"{drop:+6.2f} |")


def fashion_table(n_calib: int) -> dict:
    from edgec.driver.pipeline import Pipeline
    from edgec.core.stats import model_stats

    model, xt, yt, xc = setup(n_calib)
    st = model_stats(model)
    base = {"criterion": "original", "reconstruct": "-", "macs": st.macs // 500,
            "params": st.params, "accuracy": accuracy(model, xt, yt)}
    print("| criterion    | refit | MACs/img | fewer   | params   | test acc | drop pt |")
    print("|---|---|---|---|---|---|---|")
    print(_row(base, base))
    rows = [base]
    grid = [{"alpha": a} for a in ("0.98", "0.99", "0.995", "0.999")] + \
        [{"ratio": r} for r in ("0.2", "0.3", "0.4")]
    for sets in grid:
        for rec in ("false", "true"):
            t0 = time.perf_counter()
            res = Pipeline(["prune"], {"prune": dict(sets, reconstruct=rec)},
                           calib={"input": xc}).run(model)
            st = model_stats(res.model)
            rep = res.reports[0]
            rows.append({"criterion": ", ".join(f"{k}={v}" for k, v in sets.items()),
                         "reconstruct": "yes" if rec == "true" else "no",
                         "macs": st.macs // 500, "params": st.params,
                         "accuracy": accuracy(res.model, xt, yt),
                         "seconds": time.perf_counter() - t0,
                         "kept": {g["producers"][0]: f"{g.get('kept', g['channels'])}/"
                                  f"{g['channels']}" for g in rep.details["groups"]}})
            print(_row(rows[-1], base), flush=True)
    return {"rows": rows}


def fashion_compiled(n_calib: int, tmp: Path) -> dict:
    from edgec.driver.check import check
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import fashion_mnist

    xc, _ = fashion_mnist.load("train", n_calib)
    xt, yt = fashion_mnist.load("test")
    src = ROOT / "models" / "fashion_mnist_cnn.onnx"
    out = {}
    for label, passes, sets in (
            ("prune", ["prune"], [f"prune.{k}={v}" for k, v in HEADLINE.items()]),
            ("prune+lowrank", ["prune", "lowrank"],
             [f"prune.{k}={v}" for k, v in HEADLINE.items()] + ["lowrank.model_mac_ratio=0.6"])):
        art = tmp / f"fashion-{label}"
        rep = compile_model(src, art, CompileOptions(
            target="x86", passes=passes, sets=sets, input_shapes={"input": (100, 1, 28, 28)},
            calib={"input": xc}, progress=False))
        res = check(src, art, {"input": xt, "labels": yt}, max_drop=1.0)
        acc = res["accuracy"]
        out[label] = {"macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
                      "accuracy": acc, "drop": res["accuracy_drop"], "ok": res["ok"]}
        print(f"compiled {label:<14} {sets}: MACs {rep['before']['macs'] / 1e6:.1f} M -> "
              f"{rep['after']['macs'] / 1e6:.1f} M per 100 images "
              f"({100 * (1 - rep['after']['macs'] / rep['before']['macs']):.1f} % fewer); "
              f"edgec check, 10000 test images: original {100 * acc['reference']:.2f} %, "
              f"compiled {100 * acc['compiled']:.2f} % (drop {res['accuracy_drop']:.2f})",
              flush=True)
    return out


def zoo_latency(names: list[str], ratio: str, threads: int, repeat: int, tmp: Path) -> dict:
    import numpy as np

    from edgec.driver.bench import bench
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import zoo

    out = {}
    for name in names:
        src = tmp / f"{name}.onnx"
        zoo.export(name, src, seed=0, batch=1)
        shape = zoo.input_shape(name, 1)
        import onnx

        iname = onnx.load(src).graph.input[0].name
        calib = {iname: np.random.default_rng(0).standard_normal([32] + shape[1:])
                 .astype(np.float32)}
        for label, passes, sets in (("original", None, []),
                                    ("pruned", ["prune"], [f"prune.ratio={ratio}",
                                                           "prune.round_to=16"])):
            art = tmp / f"{name}-{label}"
            rep = compile_model(src, art, CompileOptions(
                target="x86", passes=passes, sets=sets, calib=calib if passes else None,
                use_tuning_db=False, progress=False))
            r = bench(src, art, threads=threads, repeat=repeat, peak=False)
            out[f"{name}-{label}"] = {"macs": rep["after"]["macs"],
                                      "params": rep["after"]["params"],
                                      "onnxruntime_ms": r["onnxruntime_ms"],
                                      "edgec_ms": r["edgec_ms"], "ratio": r["ratio"]}
            print(f"{name:<13} {label:<9} MACs {rep['after']['macs'] / 1e9:.3f} G params "
                  f"{rep['after']['params'] / 1e6:.2f} M  onnxruntime (original) "
                  f"{r['onnxruntime_ms']:.2f} ms  edgec {r['edgec_ms']:.2f} ms  ratio "
                  f"{r['ratio']:.2f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=2000)
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--skip-zoo", action="store_true")
    p.add_argument("--zoo", default="resnet18,mobilenet_v2")
    p.add_argument("--ratio", default="0.3", help="zoo models' prune.ratio")
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
            result["fashion"] = fashion_table(a.calib)
            result["fashion_compiled"] = fashion_compiled(a.calib, tmp)
        if not a.skip_zoo:
            result["zoo"] = zoo_latency(a.zoo.split(","), a.ratio, a.threads, a.repeat, tmp)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    from _results import main_recorded

    sys.exit(main_recorded("prune_table", "prune on the trained Fashion-MNIST CNN", main))
