"""int8 speed: compiled int8 vs compiled fp32 vs onnxruntime on the same QDQ model.

    python benchmarks/int8_bench.py [--models resnet18,mobilenet_v2] [--threads 2]
                                    [--repeat 30] [--mcpu CPU] [--weight-bits auto,8,7]
                                    [--json FILE]

For each zoo model (random weights, batch 1, 224x224): the fp32 model and its int8 QDQ form
(``--passes quantize`` for the target, minmax, calibrated on 16 seeded normal images -- speed
does not depend on the calibration; ``quantize.weight_bits`` from ``--weight-bits``, one row
each: ``auto`` is 7 on x86 without VNNI) are compiled for x86 (the host CPU, or ``--mcpu`` to
force another ISA: ``haswell`` gives the AVX2 kernels; onnxruntime still runs on the host's
own ISA, e.g. VNNI, so on a VNNI host its QDQ time is not what an AVX2 machine would see).
``edgec.driver.bench.bench`` times each artifact against
onnxruntime running the same ONNX file, in separate processes, same thread count. Prints:

* onnxruntime fp32, onnxruntime QDQ (its QLinearConv path), edgec fp32, edgec int8 (ms);
* edgec int8 speed-up over edgec fp32 (goal >= 1.5);
* onnxruntime QDQ / edgec int8 (goal > 1: edgec faster on the same QDQ model);
* the integer ISA edgec used and how many convolutions got integer kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--mcpu")
    p.add_argument("--weight-bits", default="auto")
    p.add_argument("--json")
    a = p.parse_args(argv)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    import onnx

    from edgec.driver.bench import bench
    from edgec.driver.compiler import CompileOptions, compile_model, target_info
    from edgec.models import zoo
    from edgec.driver.pipeline import NORMALIZE, Pipeline

    opts = {"mcpu": a.mcpu} if a.mcpu else {}
    tinfo = target_info(CompileOptions(target="x86", target_options=opts))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDGEC_CACHE"] = str(tmp / "cache")
        for name in a.models.split(","):
            m = Pipeline(NORMALIZE).run(zoo.build(name, seed=0, batch=1)).model
            inp = m.graph.input[0]
            shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            calib = np.random.default_rng(0).standard_normal([16] + shape[1:]).astype("float32")
            fp32 = tmp / f"{name}.onnx"
            onnx.save(m, fp32)
            fp = None
            for wb in a.weight_bits.split(","):
                qr = Pipeline(["quantize"], {"quantize": {"progress": "false",
                                                          "weight_bits": wb}},
                              calib={inp.name: calib}, target=tinfo).run(m)
                int8 = tmp / f"{name}-int8-{wb}.onnx"
                onnx.save(qr.model, int8)
                r = {"model": name, "weight_bits": qr.reports[-1].details["weight_bits"]}
                for tag, src in (("fp32", fp32), ("int8", int8)):
                    if tag == "fp32" and fp is not None:  # once per model
                        r["ort_fp32_ms"], r["edgec_fp32_ms"] = fp
                        continue
                    art = tmp / f"art-{name}-{tag}-{wb}"
                    rep = compile_model(src, art, CompileOptions(
                        target="x86", target_options=opts, use_tuning_db=False))
                    if tag == "int8":
                        r["int8_kernels"] = rep["kernels"].get("int8")
                    b = bench(src, art, threads=a.threads, repeat=a.repeat, peak=False)
                    r[f"ort_{tag}_ms"], r[f"edgec_{tag}_ms"] = b["onnxruntime_ms"], b["edgec_ms"]
                fp = (r["ort_fp32_ms"], r["edgec_fp32_ms"])
                r["int8_over_fp32"] = r["edgec_fp32_ms"] / r["edgec_int8_ms"]
                r["ort_qdq_over_edgec_int8"] = r["ort_int8_ms"] / r["edgec_int8_ms"]
                rows.append(r)
                k = r["int8_kernels"] or {}
                print(f"{name} ({r['weight_bits']}-bit weights): isa {k.get('isa')}, "
                      f"{k.get('conv2d')} integer convs ({k.get('weights_7bit', 0)} in the "
                      f"7-bit form, {k.get('winograd', 0)} integer Winograd), "
                      f"{k.get('matmul', 0)} integer matmuls, "
                      f"{k.get('dwconv2d')} depthwise on 8-bit input, float: {k.get('float')}",
                      flush=True)
    print(f"\n{a.threads} threads, batch 1, x86 mcpu {a.mcpu or 'host'}; medians of {a.repeat}")
    print("| model | weight bits | ort fp32 ms | ort QDQ ms | edgec fp32 ms | edgec int8 ms | "
          "int8 speed-up vs edgec fp32 | ort QDQ / edgec int8 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weight_bits']} | {r['ort_fp32_ms']:.2f} | "
              f"{r['ort_int8_ms']:.2f} | "
              f"{r['edgec_fp32_ms']:.2f} | {r['edgec_int8_ms']:.2f} | "
              f"{r['int8_over_fp32']:.2f}x | {r['ort_qdq_over_edgec_int8']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from _results import arg_value, main_recorded

    sys.exit(main_recorded(
        lambda a: "int8_bench-" + (arg_value(a, "--mcpu") or "host"),
        lambda a: "int8: compiled int8 vs fp32 vs onnxruntime's QDQ run, x86 mcpu "
                  + (arg_value(a, "--mcpu") or "host"), main))
