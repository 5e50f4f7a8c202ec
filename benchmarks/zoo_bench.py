"""onnxruntime vs edgec on the zoo, measured in the same run.

    python benchmarks/zoo_bench.py [--models resnet18,mobilenet_v2,efficientnet_b0,fashion_cnn]
                                   [--target x86] [--threads 2] [--repeat 10] [--json FILE]

For each model: compile (default preset, untuned), then ``edgec.bench.bench`` -- same inputs,
same thread count, medians -- and print onnxruntime ms, edgec ms, the ratio
onnxruntime/edgec, GFLOP/s of each and the numpy sgemm peak measured in the same run.
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
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from edgec.bench import bench, sgemm_peak_gflops
    from edgec.compiler import CompileOptions, compile_model
    from edgec.models import zoo

    peak = sgemm_peak_gflops(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            src = Path(tmp) / f"{name}.onnx"
            zoo.export(name, src, seed=0, batch=a.batch)
            t0 = time.perf_counter()
            compile_model(src, Path(tmp) / name, CompileOptions(target=a.target))
            compile_s = time.perf_counter() - t0
            r = bench(src, Path(tmp) / name, threads=a.threads, repeat=a.repeat, peak=False)
            r.update(model=name, compile_s=compile_s, sgemm_peak_gflops=peak)
            rows.append(r)
            print(f"{name:<16} ort {r['onnxruntime_ms']:9.2f} ms  edgec {r['edgec_ms']:9.2f} ms  "
                  f"ratio {r['ratio']:.3f}  GFLOP/s ort {r['onnxruntime_gflops']:6.1f} "
                  f"edgec {r['edgec_gflops']:6.1f}  (compile {compile_s:.1f}s)", flush=True)
    print(f"\n{a.threads} threads, batch {a.batch}, target {a.target}, numpy sgemm peak "
          f"{peak:.1f} GFLOP/s")
    print(f"{'model':<16} {'GMAC':>7} {'ort ms':>9} {'edgec ms':>10} {'ort/edgec':>10} "
          f"{'ort %peak':>10} {'edgec %peak':>12}")
    for r in rows:
        print(f"{r['model']:<16} {r['macs_original'] / 1e9:7.3f} {r['onnxruntime_ms']:9.2f} "
              f"{r['edgec_ms']:10.2f} {r['ratio']:10.3f} "
              f"{100 * r['onnxruntime_gflops'] / peak:9.1f}% {100 * r['edgec_gflops'] / peak:11.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
