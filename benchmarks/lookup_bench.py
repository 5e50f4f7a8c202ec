"""The reuse-lookup kernel against edgec's int8 and fp32 kernels and onnxruntime.

    nice -n 19 python benchmarks/lookup_bench.py [--threads 2] [--repeat 50] [--mcpu CPU]
                                                 [--no-record]

1. Gemm 1024 x 1024 (weights fit in L2) and 4096 x 4096 (they do not) (bias, batch 1) with
   weights of 2, 4 and 16 distinct values (codebook
   weights, seeded): the lookup kernel (edgec fp32 compile of the codebook model with
   ``EDGEC_LOOKUP=force``: also where the chooser takes the dense kernel, the last column);
   edgec's dense fp32 kernel on the same model (``EDGEC_LOOKUP=0``); edgec's int8 kernel (``--passes
   quantize`` of the dense random model, calibrated on 64 random rows); onnxruntime on the
   codebook model (fp32) and on the int8 QDQ artifact's ``model.onnx``. All edgec timings by
   the TVM runtime in this process (3 alternating rounds, fastest round median), onnxruntime
   by ``edgec.driver.bench`` in its own process.
2. The Fashion-MNIST CNN through ``--passes cluster`` (bits 2 and 4, with calibration on
   1000 training images), batch 1: the report's multiplies (dense vs executed) per layer and
   kernel, and accuracy compiled on 1000 test images.
Section ``lookup_bench`` of docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import arg_value, host, main_recorded  # noqa: E402
from sparse_bench import _timers  # noqa: E402


def gemm(values: int | None, k=1024, n=1024, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if values is None:
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    else:
        code = (rng.standard_normal(values) / np.sqrt(k)).astype(np.float32)
        w = code[rng.integers(0, values, (n, k))]
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _compile(src: Path, out: Path, mcpu, passes=(), sets=(), calib=None, env=None):
    from edgec.driver.compiler import CompileOptions, compile_model

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return compile_model(src, out, CompileOptions(
            target="x86", target_options={"mcpu": mcpu} if mcpu else {}, passes=list(passes),
            sets=list(sets), calib=calib, progress=False))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gemm_table(mcpu, repeat, threads, tmp: Path, size: int = 1024, counts=(2, 4, 16)) -> None:
    import onnx

    from edgec.driver.bench import bench

    tmp = tmp / f"g{size}"
    tmp.mkdir()
    print(f"### Gemm {size} x {size}, batch 1\n")
    dense_src = tmp / "dense.onnx"
    onnx.save(gemm(None, size, size), dense_src)
    calib = {"x": np.random.default_rng(1).standard_normal((64, size)).astype(np.float32)}
    _compile(dense_src, tmp / "int8", mcpu, ["quantize"], calib=calib)
    arts, rows = [tmp / "int8"], []
    for values in counts:
        src = tmp / f"cb{values}.onnx"
        onnx.save(gemm(values, size, size), src)
        rep = _compile(src, tmp / f"lut{values}", mcpu, env={"EDGEC_LOOKUP": "force"})
        (layer,) = rep["kernels"]["structured"]
        assert layer["kernel"] == "lookup", layer
        (chosen,) = _compile(src, tmp / f"default{values}", mcpu)["kernels"]["structured"]
        _compile(src, tmp / f"fp{values}", mcpu, env={"EDGEC_LOOKUP": "0"})
        arts += [tmp / f"lut{values}", tmp / f"fp{values}"]
        rows.append((values, src, layer, chosen["kernel"]))
    times = dict(zip(arts, _timers(arts, repeat)))
    int8_ms = times[tmp / "int8"] * 1e3
    ort_q = bench(tmp / "int8" / "model.onnx", tmp / "int8", threads=threads, repeat=repeat,
                  peak=False)["onnxruntime_ms"]
    print(f"edgec int8 (quantize, {_int8_kernel(tmp / 'int8')}): {int8_ms:.4f} ms; "
          f"onnxruntime on its QDQ model.onnx: {ort_q:.4f} ms\n")
    print("| values | lookup ms | fp32 dense ms | int8 ms | onnxruntime fp32 ms | "
          "lookup vs int8 | vs fp32 | vs onnxruntime | multiplies executed | weight bytes | "
          "kernel by default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for values, src, layer, chosen in rows:
        lut = times[tmp / f"lut{values}"] * 1e3
        fp = times[tmp / f"fp{values}"] * 1e3
        ort = bench(src, tmp / f"lut{values}", threads=threads, repeat=repeat,
                    peak=False)["onnxruntime_ms"]
        share = layer["multiplies_executed"] / layer["multiplies_dense"]
        print(f"| {values} | {lut:.4f} | {fp:.4f} | {int8_ms:.4f} | {ort:.4f} | "
              f"{int8_ms / lut:.2f}x | {fp / lut:.2f}x | {ort / lut:.2f}x | {100 * share:.2f} % | "
              f"{layer['weight_bytes'] / 1e3:.0f} kB of {layer['dense_bytes'] / 1e3:.0f} | "
              f"{chosen} |")
    print()


def _int8_kernel(art: Path) -> str:
    import json

    kinds = json.loads((art / "report.json").read_text())["kernels"]["counts"]
    return ", ".join(k for k in kinds if "int8" in k) or "?"


def fashion_table(mcpu, tmp: Path) -> None:
    from edgec.models import fashion_mnist
    from edgec.runtime import Session

    print("### Fashion-MNIST CNN, `--passes cluster` (calibrated), batch 1\n")
    xc, _ = fashion_mnist.load("train", 1000)
    xt, yt = fashion_mnist.load("test", 1000)
    src = ROOT / "models" / "fashion_mnist_cnn.onnx"
    print("| bits | accuracy (1000 test images) | Gemm multiplies executed | all layers | "
          "kernels |")
    print("|---|---|---|---|---|")
    for bits in (None, 4, 2):
        out = tmp / f"fashion{bits}"
        from edgec.driver.compiler import CompileOptions, compile_model

        rep = compile_model(src, out, CompileOptions(
            target="x86", target_options={"mcpu": mcpu} if mcpu else {},
            passes=["cluster"] if bits else [], sets=[f"cluster.bits={bits}"] if bits else [],
            calib={"input": xc} if bits else None, input_shapes={"input": (1, 1, 28, 28)},
            progress=False))
        s = Session(out)
        hits = sum(int(s.run(None, {"input": xt[i:i + 1]})[0].argmax() == yt[i])
                   for i in range(len(xt)))
        layers = rep["kernels"].get("structured", [])
        gem = [x for x in layers if x["op"] == "matmul"]
        dense = sum(x["multiplies_dense"] for x in layers)
        done = sum(x["multiplies_executed"] for x in layers)
        gshare = (sum(x["multiplies_executed"] for x in gem) /
                  max(1, sum(x["multiplies_dense"] for x in gem)))
        kinds = sorted({x["kernel"] for x in layers})
        share = (lambda v: f"{100 * v:.2f} %") if layers else (lambda v: "- (dense)")
        print(f"| {bits or 'dense'} | {100 * hits / len(xt):.1f} % | {share(gshare)} | "
              f"{share(done / max(dense, 1))} | {', '.join(kinds) or '-'} |")
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--mcpu", default=None)
    a = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    print(f"host: {host()}; target x86{' -mcpu ' + a.mcpu if a.mcpu else ''}; "
          f"{a.threads} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        gemm_table(a.mcpu, a.repeat, a.threads, Path(tmp))
        gemm_table(a.mcpu, a.repeat, a.threads, Path(tmp), 4096, (2, 4))
        fashion_table(a.mcpu, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main_recorded(
        lambda argv: "lookup_bench" + (f"-{m}" if (m := arg_value(argv, "--mcpu")) else ""),
        "Reuse-lookup kernel", main))
