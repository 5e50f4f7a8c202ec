"""ConvTranspose speed: edgec before (TOPI's dilated-input loop) vs after (the phase
decomposition, ``targets/cpu/rewrites/conv_transpose.py``) vs onnxruntime.

    nice -n 19 python benchmarks/conv_transpose_bench.py [--threads 2] [--repeat 10]
                                                         [--before-repeat 1] [--mcpu CPU]
                                                         [--cases all|NAME,..]
                                                         [--no-before] [--json FILE]

Single ConvTranspose layers like a DB text detector's upsamplers (random weights, bias,
ReLU after, batch 1). Each is compiled twice for x86 (host CPU or ``--mcpu``): with
``EDGEC_NO_CONVT_REWRITE=1`` (the old path) and without; ``edgec.driver.bench.bench`` times
each artifact against onnxruntime running the same ONNX file, each in its own fresh process,
same thread count, medians (the old path, seconds per run: ``--before-repeat`` runs and no
warm-up; the onnxruntime column is the one timed beside the new artifact). Prints a table
(ms; ratio = onnxruntime ms / edgec ms, above 1: edgec faster) and the kernels the report
lists. Does not write ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# name: (cin, cout, h, w, kernel, stride, pads, output_padding, group)
CASES = {
    "k2s2_64to64_160": (64, 64, 160, 160, 2, 2, 0, 0, 1),
    "k2s2_96to64_80": (96, 64, 80, 80, 2, 2, 0, 0, 1),
    "k3s2p1op1_64to64_80": (64, 64, 80, 80, 3, 2, 1, 1, 1),
    "k4s2p1_64to32_80": (64, 32, 80, 80, 4, 2, 1, 0, 1),
    "k4s2p1_dw64_80": (64, 64, 80, 80, 4, 2, 1, 0, 64),
}


def layer(cin, cout, h, w, k, s, p, op, group, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    wt = (rng.standard_normal((cin, cout // group, k, k)) / np.sqrt(cin * k * k / group))
    b = rng.standard_normal(cout) * 0.1
    oh, ow = ((h - 1) * s + k + op - 2 * p, (w - 1) * s + k + op - 2 * p)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], kernel_shape=[k, k],
                              strides=[s, s], pads=[p, p, p, p], output_padding=[op, op],
                              group=group),
             helper.make_node("Relu", ["y"], ["z"])]
    g = helper.make_graph(
        nodes, "convt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, cout, oh, ow])],
        [numpy_helper.from_array(wt.astype(np.float32), "W"),
         numpy_helper.from_array(b.astype(np.float32), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--before-repeat", type=int, default=1)
    p.add_argument("--cases", default="all")
    p.add_argument("--mcpu")
    p.add_argument("--no-before", action="store_true", help="skip the old path")
    p.add_argument("--json")
    a = p.parse_args(argv)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    import onnx

    from edgec.driver.bench import bench
    from edgec.driver.compiler import CompileOptions, compile_model

    names = list(CASES) if a.cases == "all" else a.cases.split(",")
    opts = {"mcpu": a.mcpu} if a.mcpu else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDGEC_CACHE"] = str(tmp / "cache")
        for name in names:
            src = tmp / f"{name}.onnx"
            onnx.save(layer(*CASES[name]), src)
            r = {"case": name}
            for tag in (("after",) if a.no_before else ("before", "after")):
                art = tmp / f"art-{name}-{tag}"
                if tag == "before":
                    os.environ["EDGEC_NO_CONVT_REWRITE"] = "1"
                try:
                    rep = compile_model(src, art, CompileOptions(
                        target="x86", target_options=opts, use_tuning_db=False))
                finally:
                    os.environ.pop("EDGEC_NO_CONVT_REWRITE", None)
                # the old path runs for seconds: one timed run after none to warm up
                runs = dict(repeat=a.repeat) if tag == "after" else \
                    dict(repeat=a.before_repeat, warmup=0, rounds=1)
                b = bench(src, art, threads=a.threads, peak=False, **runs)
                r[f"ort_{tag}_ms"], r[f"edgec_{tag}_ms"] = b["onnxruntime_ms"], b["edgec_ms"]
                r[f"kernels_{tag}"] = rep["kernels"]["functions"]
            # onnxruntime's median from the run beside the new artifact (warmed up, repeated)
            r["ort_ms"] = r["ort_after_ms"]
            rows.append(r)
            print(name, json.dumps({k: v for k, v in r.items() if k != "case"}), flush=True)
    print(f"\n{a.threads} threads, batch 1, x86 mcpu {a.mcpu or 'host'}; medians of {a.repeat}"
          f" (the old path: {a.before_repeat} run(s), no warm-up)")
    print("| layer | ort ms | edgec before ms | ratio before | edgec after ms | ratio after | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        before = r.get("edgec_before_ms")
        print(f"| {r['case']} | {r['ort_ms']:.2f} | "
              + (f"{before:.2f} | {r['ort_ms'] / before:.2f} | " if before else "- | - | ")
              + f"{r['edgec_after_ms']:.2f} | {r['ort_ms'] / r['edgec_after_ms']:.2f} | "
              + (f"{before / r['edgec_after_ms']:.1f}x |" if before else "- |"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
