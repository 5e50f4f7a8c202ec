"""onnxruntime vs edgec on the zoo, measured in the same run.

    python benchmarks/zoo_bench.py [--models resnet18,mobilenet_v2,efficientnet_b0,fashion_cnn]
                                   [--threads 2] [--repeat 30] [--tune-minutes M] [--json FILE]

For each model: compile with the default kernels only (no tuning database), then -- with
``--tune-minutes`` -- tune for that budget into a private cache and compile again. Each
artifact is timed by ``edgec.driver.bench.bench`` (same inputs, same thread count as onnxruntime,
medians). Prints onnxruntime ms, edgec ms, the ratio onnxruntime/edgec (> 1: edgec faster),
GFLOP/s and % of the sgemm peak measured in the same run (edgec.driver.bench.sgemm_peak_gflops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,fashion_cnn")
    p.add_argument("--target", default="x86")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tune-minutes", type=float)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from edgec.driver.bench import bench, sgemm_peak_gflops
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import zoo

    peak = sgemm_peak_gflops(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGEC_CACHE"] = str(Path(tmp) / "cache")
        for name in a.models.split(","):
            src = Path(tmp) / f"{name}.onnx"
            zoo.export(name, src, seed=0, batch=a.batch)
            t0 = time.perf_counter()
            compile_model(src, Path(tmp) / name, CompileOptions(target=a.target,
                                                                use_tuning_db=False))
            compile_s = time.perf_counter() - t0
            r = bench(src, Path(tmp) / name, threads=a.threads, repeat=a.repeat, peak=False)
            r.update(model=name, compile_s=compile_s, sgemm_peak_gflops=peak)
            if a.tune_minutes:
                t0 = time.perf_counter()
                rep = compile_model(src, Path(tmp) / f"{name}-tuned", CompileOptions(
                    target=a.target, tune_minutes=a.tune_minutes, progress=False))
                r["tune_s"] = time.perf_counter() - t0
                r["tuned_tasks"] = rep["kernels"]["counts"].get("tuned", 0)
                rt = bench(src, Path(tmp) / f"{name}-tuned", threads=a.threads,
                           repeat=a.repeat, peak=False)
                r["tuned_ms"] = rt["edgec_ms"]
                r["tuned_ratio"] = rt["onnxruntime_ms"] / rt["edgec_ms"]
            rows.append(r)
            print(f"{name:<16} ort {r['onnxruntime_ms']:8.2f} ms  edgec {r['edgec_ms']:8.2f} ms  "
                  f"ratio {r['ratio']:.3f}" + (f"  tuned {r['tuned_ms']:8.2f} ms ratio "
                                               f"{r['tuned_ratio']:.3f}" if a.tune_minutes
                                               else ""), flush=True)
    print(f"\n{a.threads} threads, batch {a.batch}, target {a.target}; sgemm peak "
          f"{peak:.1f} GFLOP/s" + (f"; tuning budget {a.tune_minutes} min/model"
                                   if a.tune_minutes else ""))
    head = (f"{'model':<16} {'GMAC':>6} {'ort ms':>8} {'edgec ms':>9} {'ort/edgec':>9} "
            f"{'ort GF/s':>8} {'edgec GF/s':>10} {'ort %pk':>7} {'edgec %pk':>9}")
    if a.tune_minutes:
        head += f" {'tuned ms':>9} {'ort/tuned':>9}"
    print(head)
    for r in rows:
        line = (f"{r['model']:<16} {r['macs_original'] / 1e9:6.3f} {r['onnxruntime_ms']:8.2f} "
                f"{r['edgec_ms']:9.2f} {r['ratio']:9.3f} {r['onnxruntime_gflops']:8.1f} "
                f"{r['edgec_gflops']:10.1f} {100 * r['onnxruntime_gflops'] / peak:6.1f}% "
                f"{100 * r['edgec_gflops'] / peak:8.1f}%")
        if a.tune_minutes:
            line += f" {r['tuned_ms']:9.2f} {r['tuned_ratio']:9.3f}"
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from _results import arg_value, main_recorded

    sys.exit(main_recorded(
        lambda a: "zoo_bench" + ("-tuned" if arg_value(a, "--tune-minutes") else ""),
        lambda a: "Zoo: onnxruntime vs edgec, fp32" + (", tuned" if arg_value(
            a, "--tune-minutes") else ", untuned"), main))
