"""The quantize pass (int8 QDQ) on the trained Fashion-MNIST CNN.

    python benchmarks/quantize_table.py [--calib 1000] [--threads 2] [--repeat 20] [--json F]

1. For each weight width (8 and 7 bits, ``weight_bits``), activation calibration method
   (minmax, percentile, entropy, mse) and weight clipping (minmax, mse): test accuracy of the
   QDQ model in onnxruntime (all 10 000 test images; calibration: the first ``--calib``
   training images) -- the exact QDQ arithmetic (graph optimizations off) and onnxruntime's
   optimized run on this host (its fused int8 kernels, which saturate on x86 without VNNI
   for 8-bit weights) -- drop in points, file size relative to fp32.
2. The best method of each width compiled by TVM for x86, for this host's CPU and with
   ``--mcpu haswell`` (the AVX2 kernels): accuracy and top-1 agreement of the compiled int8
   artifact with onnxruntime's exact run of the same QDQ model, over the test set. fp16
   (compute fp16, and fp16 storage with fp32 compute): accuracy in onnxruntime and compiled.
3. Latency in one run: onnxruntime fp32, onnxruntime on the QDQ model, edgec fp32, edgec int8
   (``edgec bench``), batch 100.
4. ``--passes prune,lowrank,quantize`` composed: MACs, size and accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 100


def _acc(model_or_path, x, y, optimize=None) -> tuple[float, np.ndarray]:
    from edgec.runtime import OrtSession

    s = OrtSession(model_or_path, optimize=optimize)
    pred = np.concatenate([s.run(None, {"input": x[i:i + BATCH]})[0].argmax(1)
                           for i in range(0, len(x), BATCH)])
    return float(np.mean(pred == y)), pred


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=1000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args(argv)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    import onnx

    from edgec.driver.bench import bench
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.core.importer import load_model, normalize
    from edgec.models import fashion_mnist
    from edgec.driver.pipeline import NORMALIZE, Pipeline
    from edgec.runtime import Session

    xt, yt = fashion_mnist.load("test")
    xc, _ = fashion_mnist.load("train", a.calib)
    src = ROOT / "models" / "fashion_mnist_cnn.onnx"
    model, _ = normalize(load_model(src), {"input": (BATCH, 1, 28, 28)})
    model = Pipeline(NORMALIZE).run(model).model
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDGEC_CACHE"] = str(tmp / "cache")
        onnx.save(model, tmp / "fp32.onnx")
        fp32_size = os.path.getsize(tmp / "fp32.onnx")
        base, _ = _acc(model, xt, yt)
        print("| weight bits | activations | weights | test acc (exact QDQ) | drop pt | "
              "onnxruntime optimized, this host | size vs fp32 |")
        print("|---|---|---|---|---|---|---|")
        print(f"| fp32 | | | {base * 100:.2f} % | | | 1.00 |")
        rows = []
        for bits in (8, 7):
            for method in ("minmax", "percentile", "entropy", "mse"):
                for wm in ("minmax", "mse"):
                    res = Pipeline(["quantize"], {"quantize": {
                        "method": method, "weight_method": wm, "weight_bits": str(bits),
                        "progress": "false"}}, calib={"input": xc}).run(model)
                    path = tmp / f"q{bits}-{method}-{wm}.onnx"
                    onnx.save(res.model, path)
                    acc, _ = _acc(res.model, xt, yt)
                    acc_host, _ = _acc(res.model, xt, yt, optimize=True)
                    rows.append({"weight_bits": bits, "method": method, "weight_method": wm,
                                 "accuracy": acc, "drop": (base - acc) * 100,
                                 "accuracy_ort_optimized_here": acc_host,
                                 "size_ratio": os.path.getsize(path) / fp32_size, "path": path})
                    r = rows[-1]
                    print(f"| {bits} | {method} | {wm} | {acc * 100:.2f} % | {r['drop']:+.2f} | "
                          f"{acc_host * 100:.2f} % | {r['size_ratio']:.3f} |", flush=True)
        result["methods"] = [{k: v for k, v in r.items() if k != "path"} for r in rows]

        # compiled int8 (this host's kernels and the AVX2 ones) vs exact QDQ in onnxruntime
        result["compiled_int8"] = []
        print("\n| weight bits | method | kernels | compiled acc | onnxruntime acc (exact) | "
              "top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for bits in (8, 7):
            best = max((r for r in rows if r["weight_bits"] == bits),
                       key=lambda r: r["accuracy"])
            qsrc = best["path"]
            acc_q, pred_ort = _acc(qsrc, xt, yt)
            for mcpu in (None, "haswell"):
                art = tmp / f"int8-{bits}-{mcpu}"
                rep = compile_model(qsrc, art, CompileOptions(
                    target="x86", progress=False,
                    target_options={"mcpu": mcpu} if mcpu else {}))
                sess = Session(art)
                pred_tvm = np.concatenate([sess.run(None, {"input": xt[i:i + BATCH]})[0]
                                           .argmax(1) for i in range(0, len(xt), BATCH)])
                agree = float(np.mean(pred_tvm == pred_ort))
                kinds = sorted({k for k in rep["kernels"]["counts"] if "int8" in k})
                row = {"weight_bits": bits, "method": best["method"],
                       "weight_method": best["weight_method"], "mcpu": mcpu or "host",
                       "kernels": kinds, "top1_agreement_vs_ort_qdq": agree,
                       "accuracy_compiled": float(np.mean(pred_tvm == yt)),
                       "accuracy_ort_qdq": acc_q}
                result["compiled_int8"].append(row)
                print(f"| {bits} | {best['method']}/{best['weight_method']} | "
                      f"{', '.join(kinds)} | {row['accuracy_compiled'] * 100:.2f} % | "
                      f"{acc_q * 100:.2f} % | {agree * 100:.2f} % |", flush=True)
            if bits == 8:
                art8, qsrc8 = tmp / "int8-8-None", qsrc
        art, qsrc = art8, qsrc8

        # fp16: compute in fp16 (cuda / +fp16 targets) and the x86 variant (fp16 storage,
        # fp32 compute), onnxruntime and compiled (x86)
        result["fp16"] = []
        print("\n| fp16 | test acc (ort) | drop pt | size vs fp32 | compiled acc (tvm x86) | "
              "top-1 agreement tvm vs ort |")
        print("|---|---|---|---|---|---|")
        for compute in ("fp16", "fp32"):
            res = Pipeline(["quantize"], {"quantize": {"mode": "fp16", "compute": compute}}
                           ).run(model)
            path = tmp / f"fp16-{compute}.onnx"
            onnx.save(res.model, path)
            acc16, pred16 = _acc(res.model, xt, yt)
            art16 = tmp / f"fp16-{compute}"
            compile_model(path, art16, CompileOptions(target="x86", progress=False))
            s16 = Session(art16)
            p16 = np.concatenate([s16.run(None, {"input": xt[i:i + BATCH]})[0].argmax(1)
                                  for i in range(0, len(xt), BATCH)])
            row = {"compute": compute, "accuracy": acc16, "drop": (base - acc16) * 100,
                   "size_ratio": os.path.getsize(path) / fp32_size,
                   "accuracy_compiled": float(np.mean(p16 == yt)),
                   "top1_agreement": float(np.mean(p16 == pred16))}
            result["fp16"].append(row)
            label = "weights+activations fp16" if compute == "fp16" else \
                "fp16 weights, fp32 compute (x86)"
            print(f"| {label} | {acc16 * 100:.2f} % | {row['drop']:+.2f} | "
                  f"{row['size_ratio']:.3f} | {row['accuracy_compiled'] * 100:.2f} % | "
                  f"{row['top1_agreement'] * 100:.2f} % |", flush=True)

        # latency, one run
        art32 = tmp / "fp32"
        compile_model(tmp / "fp32.onnx", art32, CompileOptions(target="x86", progress=False))
        b32 = bench(tmp / "fp32.onnx", art32, threads=a.threads, repeat=a.repeat, peak=False)
        b8 = bench(qsrc, art, threads=a.threads, repeat=a.repeat, peak=False)
        result["latency_ms"] = {"onnxruntime_fp32": b32["onnxruntime_ms"],
                                "edgec_fp32": b32["edgec_ms"],
                                "onnxruntime_qdq": b8["onnxruntime_ms"],
                                "edgec_int8": b8["edgec_ms"]}
        print(f"latency, batch {BATCH}: onnxruntime fp32 {b32['onnxruntime_ms']:.2f} ms, "
              f"onnxruntime QDQ {b8['onnxruntime_ms']:.2f} ms, edgec fp32 "
              f"{b32['edgec_ms']:.2f} ms, edgec int8 {b8['edgec_ms']:.2f} ms")

        # composition
        comp = tmp / "composed"
        rep = compile_model(src, comp, CompileOptions(
            target="x86", passes=["prune", "lowrank", "quantize"],
            sets=["prune.alpha=0.995", "lowrank.model_mac_ratio=0.6", "quantize.method="
                  + best["method"], "quantize.weight_method=" + best["weight_method"]],
            input_shapes={"input": (BATCH, 1, 28, 28)}, calib={"input": xc},
            build=False, progress=False))
        acc_c, _ = _acc(comp / "model.onnx", xt, yt)
        result["composed"] = {"macs_before": rep["before"]["macs"],
                              "macs_after": rep["after"]["macs"],
                              "bytes_before": rep["before"]["bytes"],
                              "bytes_after": rep["after"]["bytes"], "accuracy": acc_c}
        print(f"prune,lowrank,quantize: MACs {rep['before']['macs'] / 1e6:.0f} M -> "
              f"{rep['after']['macs'] / 1e6:.0f} M per {BATCH} images, weight bytes "
              f"{rep['before']['bytes'] / 1e3:.0f} K -> {rep['after']['bytes'] / 1e3:.0f} K, "
              f"accuracy {acc_c * 100:.2f} % (drop {(base - acc_c) * 100:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    from _results import main_recorded

    sys.exit(main_recorded("quantize_table", "quantize on the trained Fashion-MNIST CNN", main))
