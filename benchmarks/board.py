"""aarch64 artifacts (rpi4, rpi5, arm64; fp32 and int8) on the emulated board vs onnxruntime.

    python benchmarks/board.py [--models fashion_cnn,mobilenet_v2,resnet18]
                               [--targets rpi4,rpi5,arm64] [--precisions fp32,int8]
                               [--n 1000] [--batch 8] [--zoo-images 2] [--calib 256]
                               [--board-threads 1] [--json FILE] [--no-record]

Starts TVM's RPC tracker on a free loopback port and one emulated aarch64 board (qemu user
mode, ``edgec.driver.board.serve``) under the key ``aarch64``, used for all three targets:
all are aarch64 code, and qemu's default CPU has dotprod and fp16, so rpi5 code runs. Each
(model, target, precision) is compiled here (no tuning database; int8: the ``quantize`` pass,
calibrated on the first ``--calib`` Fashion-MNIST training images, or on 16 seeded normal
images for the zoo models) in a worker process while the board runs the previous artifact
through :class:`edgec.runtime.remote.RemoteSession`. Compared with:

* fp32: onnxruntime here on the original model; error = max |board - ort| / max |ort| over
  all outputs, pass when <= 1e-4;
* int8: onnxruntime's exact QDQ run (graph optimizations off) of the artifact's rewritten
  ``model.onnx``; error in units of the output's quantization step (the scale of the
  QuantizeLinear feeding the graph output), pass when <= 1 step; where the output is not
  quantized (a float op produces it) the relative error is reported instead, pass <= 1e-4;
* Fashion-MNIST: accuracy on the first ``--n`` test images on the board, compiled for x86
  here (the same ONNX: for int8 the rpi4 artifact's QDQ model.onnx) and in onnxruntime here,
  plus the board's top-1 agreement with onnxruntime; the zoo models (seeded random weights,
  no pretrained ones: no accuracy) run ``--zoo-images`` seeded normal images, top-1
  agreement only.

Times are wall seconds per call on the board, RPC included, under EMULATION: qemu translates
each aarch64 instruction on an x86 core, ~50-100x slower than a board; they say nothing
about a Cortex-A72/A76. Tracker and board processes are killed on exit (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KEY = "aarch64"
FP32_BOUND = 1e-4
ZOO_CALIB = 16


# ------------------------------------------------------------------ tracker + emulated board
# ------------------------------------------------------------------ compiling (worker process)
def _compile_job(src: str, out: str, target: str, precision: str, calib_npz: str | None,
                 input_name: str) -> dict:
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    from edgec.driver.compiler import CompileOptions, compile_model

    kw = {}
    if precision == "int8":
        calib = dict(np.load(calib_npz))
        kw = dict(passes=["quantize"], calib={input_name: calib[input_name]},
                  sets=["quantize.progress=false"])
    t0 = time.perf_counter()
    try:
        rep = compile_model(src, out, CompileOptions(target=target, use_tuning_db=False,
                                                     progress=False, **kw))
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        from edgec.core.errors import one_line

        return {"compile_s": time.perf_counter() - t0, "error": one_line(e, 300)}
    k = rep["kernels"]
    return {"compile_s": time.perf_counter() - t0, "counts": k["counts"], "int8": k.get("int8")}


def _kernels(info: dict) -> str:
    counts = info["counts"]
    s = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    i8 = info.get("int8")
    if i8:
        s += (f"; int8 {i8.get('isa')}: {i8.get('conv2d', 0)} conv, {i8.get('dwconv2d', 0)} "
              f"dw, {i8.get('matmul', 0)} matmul, float {i8.get('float')}")
    return s


# ------------------------------------------------------------------ numerics helpers
def _init(model, name):
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _through(producer, name, ops=("Flatten", "Reshape", "Identity", "Squeeze")):
    n = producer.get(name)
    while n is not None and n.op_type in ops:
        name = n.input[0]
        n = producer.get(name)
    return n


def _dequantized(m, producer, name):
    """The constant behind ``name`` (an initializer, or DequantizeLinear of one), as float."""
    n = producer.get(name)
    if n is None:
        v = _init(m, name)
        return None if v is None else v.astype(np.float64)
    if n.op_type != "DequantizeLinear":
        return None
    q, sc = _init(m, n.input[0]), _init(m, n.input[1])
    zp = _init(m, n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if q is None or sc is None:
        return None
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    q = q.astype(np.float64) - (0 if zp is None else _bcast(zp, q, axis))
    return q * _bcast(sc.astype(np.float64), q, axis)


def _bcast(v, like, axis):
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * like.ndim
    shape[axis] = v.size
    return v.reshape(shape)


def output_step(model_path: Path) -> dict:
    """How the graph output of a QDQ model is made: ``{"step": s}`` when a QuantizeLinear
    feeds it (its scale is the output's quantization step); for a float Gemm/MatMul reading a
    quantized input (step ``s_in``) and constant weights W (rows: outputs): ``{"op", "unit",
    "bound"}`` with ``unit = s_in * max|W|`` (one input step through the largest weight) and
    ``bound = s_in * max_o sum_j |W_oj|`` (one step on every input); else ``{"op"}``."""
    import onnx

    m = onnx.load(str(model_path))
    producer = {o: n for n in m.graph.node for o in n.output}
    n = _through(producer, m.graph.output[0].name,
                 ("DequantizeLinear", "Flatten", "Reshape", "Identity", "Squeeze"))
    if n is None:
        return {"op": "graph input"}
    if n.op_type == "QuantizeLinear":
        sc = _init(m, n.input[1])
        return {"step": float(np.max(sc))} if sc is not None else {"op": "QuantizeLinear"}
    out = {"op": n.op_type}
    if n.op_type in ("Gemm", "MatMul"):
        a = _through(producer, n.input[0])
        w = _dequantized(m, producer, n.input[1])
        s_in = _init(m, a.input[1]) if a is not None and a.op_type == "DequantizeLinear" \
            else None
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
        if s_in is not None and s_in.size == 1 and w is not None and w.ndim == 2 and \
                not attrs.get("transA", 0):
            w = w if attrs.get("transB", 0) else w.T          # [outputs, inputs]
            w = w * float(attrs.get("alpha", 1.0))
            s_in = float(s_in.reshape(()))
            out.update(unit=s_in * float(np.abs(w).max()),
                       bound=s_in * float(np.abs(w).sum(1).max()), s_in=s_in)
    return out


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


# ------------------------------------------------------------------ the benchmark
def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="fashion_cnn,mobilenet_v2,resnet18")
    p.add_argument("--targets", default="rpi4,rpi5,arm64")
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--n", type=int, default=1000, help="Fashion-MNIST test images")
    p.add_argument("--batch", type=int, default=8, help="Fashion CNN compiled batch")
    p.add_argument("--zoo-images", type=int, default=2)
    p.add_argument("--calib", type=int, default=256, help="Fashion-MNIST training images")
    p.add_argument("--board-threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    if "EDGEC_EMULATOR" not in os.environ:  # the user's installed board, whatever EDGEC_CACHE
        from edgec.driver.board import default_root

        os.environ["EDGEC_EMULATOR"] = str(default_root())

    import multiprocessing as mp

    import onnx

    from edgec.driver.board import LocalBoards, missing_reason
    from edgec.models import fashion_mnist, zoo
    from edgec.runtime import OrtSession, Session, run_batched
    from edgec.runtime.remote import RemoteSession

    reason = missing_reason()
    if reason:
        print(f"no emulated board: {reason}", file=sys.stderr)
        return 2
    models, targets = a.models.split(","), a.targets.split(",")
    precisions = a.precisions.split(",")
    t_start = time.perf_counter()
    rows, boards, pool = [], None, None

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, _term)
    tmp = Path(tempfile.mkdtemp(prefix="edgec-board-"))
    try:
        # sources, inputs, calibration data, references
        data = {}
        for name in models:
            src = tmp / f"{name}.onnx"
            if name == "fashion_cnn":
                zoo.export(name, src, batch=a.batch)
                x, y = fashion_mnist.load("test", n=a.n)
                cx, _ = fashion_mnist.load("train", n=a.calib)
            else:
                zoo.export(name, src, seed=0, batch=1)
                shape = zoo.input_shape(name, batch=1)
                x = np.random.default_rng(1).standard_normal(
                    [a.zoo_images] + shape[1:]).astype(np.float32)
                y = None
                cx = np.random.default_rng(0).standard_normal(
                    [ZOO_CALIB] + shape[1:]).astype(np.float32)
            inp = onnx.load(str(src)).graph.input[0].name
            np.savez(tmp / f"{name}-calib.npz", **{inp: cx})
            b = a.batch if name == "fashion_cnn" else 1
            ref = run_batched(OrtSession(src), {inp: x}, b)[0]
            data[name] = dict(src=src, x=x, y=y, inp=inp, ort_fp32=ref, batch=b)
        jobs = [(m, t, pr) for m in models for pr in precisions for t in targets]

        # compile in a worker process while the board runs what is ready
        pool = mp.get_context("spawn").Pool(1)
        pending = {}
        for m, t, pr in jobs:
            pending[(m, t, pr)] = pool.apply_async(_compile_job, (
                str(data[m]["src"]), str(tmp / f"art-{m}-{t}-{pr}"), t, pr,
                str(tmp / f"{m}-calib.npz"), data[m]["inp"]))
        boards = LocalBoards()
        boards.add(KEY, threads=a.board_threads)
        print(f"tracker {boards.address}, one emulated board under key '{KEY}' for "
              f"{', '.join(targets)} (TVM_NUM_THREADS={a.board_threads})", flush=True)
        board_desc = None
        x86_done = {}
        for m, t, pr in jobs:
            d = data[m]
            info = pending.pop((m, t, pr)).get()
            art = tmp / f"art-{m}-{t}-{pr}"
            if "error" in info:
                rows.append({"model": m, "target": t, "precision": pr, "ok": False,
                             "compile_s": info["compile_s"], "compile_error": info["error"]})
                print(f"{m} {t} {pr}: COMPILE FAILED: {info['error']}", flush=True)
                continue
            r = {"model": m, "target": t, "precision": pr, "compile_s": info["compile_s"],
                 "kernels": _kernels(info), "counts": info["counts"]}
            # the reference: original fp32 in ort, or the exact QDQ run of the artifact's model
            if pr == "fp32":
                ref = d["ort_fp32"]
                how = {}
            else:
                ref = run_batched(OrtSession(art / "model.onnx"), {d["inp"]: d["x"]},
                                  d["batch"])[0]
                how = output_step(art / "model.onnx")
            step = how.get("step")
            sess = RemoteSession(art, boards.address, KEY)
            board_desc = board_desc or sess.board
            feeds = {d["inp"]: d["x"]}
            times = []
            outs = []
            for start in range(0, len(d["x"]), sess.batch):
                part = {d["inp"]: d["x"][start:start + sess.batch]}
                rows_ = len(part[d["inp"]])
                if rows_ < sess.batch:
                    pad = np.repeat(part[d["inp"]][-1:], sess.batch - rows_, axis=0)
                    part = {d["inp"]: np.concatenate([part[d["inp"]], pad])}
                t0 = time.perf_counter()
                outs.append(sess.run(None, part)[0][:rows_])
                times.append(time.perf_counter() - t0)
            sess = None
            gc.collect()  # ends the RPC session: the tracker hands the board out again
            got = np.concatenate(outs)
            r["emulated_s_per_call"] = float(np.median(times))
            r["call_batch"] = int(onnx.load(str(art / "model.onnx")).graph.input[0].type
                                  .tensor_type.shape.dim[0].dim_value)
            diff = np.abs(got - ref)
            r["frac_diff"] = float(np.mean(diff > 1e-6 * float(np.abs(ref).max())))
            if step is not None:
                err = float(diff.max() / step)
                r.update(metric="steps", error=err, ok=err <= 1.0 + 1e-3, step=step)
            elif pr == "int8" and "bound" in how:
                # a float Gemm reads the last quantized tensor: the relative error, and the
                # error in input steps through the largest weight; pass: explainable by at
                # most one step on every input of that op (a loose bound, said so)
                err = _rel(got, ref)
                r.update(metric=f"rel (float {how['op']} output)", error=err,
                         in_steps=float(diff.max() / how["unit"]),
                         ok=float(diff.max()) <= how["bound"] * (1 + 1e-3) + 1e-6,
                         loose=True, s_in=how["s_in"], bound_rel=how["bound"] / max(
                             float(np.abs(ref).max()), 1e-12))
            else:
                err = _rel(got, ref)
                r.update(metric="rel" if pr == "fp32" else f"rel (float {how.get('op')} "
                         "output)", error=err, ok=err <= FP32_BOUND)
            r["top1_agree"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
            if d["y"] is not None:
                r["acc_board"] = float(np.mean(got.argmax(1) == d["y"]))
                r["acc_ort"] = float(np.mean(ref.argmax(1) == d["y"]))
                if pr not in x86_done:  # compiled for x86 here: the same ONNX
                    from edgec.driver.compiler import CompileOptions, compile_model

                    x86 = tmp / f"art-{m}-x86-{pr}"
                    if pr == "fp32":
                        compile_model(d["src"], x86, CompileOptions(
                            target="x86", use_tuning_db=False, progress=False))
                    else:  # the int8 artifact's QDQ model, compiled as it is
                        compile_model(art / "model.onnx", x86, CompileOptions(
                            target="x86", passes=[], use_tuning_db=False, progress=False))
                    y86 = run_batched(Session(x86), feeds, a.batch)[0]
                    x86_done[pr] = (float(np.mean(y86.argmax(1) == d["y"])),
                                    float(np.abs(y86 - ref).max() / step) if step else
                                    _rel(y86, ref), y86)
                r["acc_x86"], r["x86_error"], y86 = x86_done[pr]
                r["board_vs_x86_top1"] = float(np.mean(got.argmax(1) == y86.argmax(1)))
                r["board_vs_x86_maxdiff"] = float(np.abs(got - y86).max())
            rows.append(r)
            print(f"{m} {t} {pr}: {r['metric']} {r['error']:.3g} "
                  f"{'pass' if r['ok'] else 'FAIL'}, top-1 agree {r['top1_agree']:.4f}"
                  + (f", acc board {r['acc_board']:.4f} x86 {r['acc_x86']:.4f} ort "
                     f"{r['acc_ort']:.4f} (x86 error {r['x86_error']:.3g}, board vs x86 top-1 "
                     f"{r['board_vs_x86_top1']:.4f}, max |board - x86| "
                     f"{r['board_vs_x86_maxdiff']:.3g})" if "acc_board" in r else "")
                  + f", compile {r['compile_s']:.0f} s, EMULATED {r['emulated_s_per_call']:.2f} "
                  f"s/call ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if pool is not None:
            pool.terminate()
            pool.join()
        if boards is not None:
            boards.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    n_fail = sum(not r["ok"] for r in rows)
    print(f"\nBoard: {board_desc}. Reference: onnxruntime here (fp32: the original model; "
          "int8: the exact QDQ run, graph optimizations off, of the artifact's model.onnx). "
          f"fp32 bound: relative max error <= {FP32_BOUND:g}; int8 bound: <= 1 quantization "
          "step of the output. **pass\\***: the output is not quantized -- a float Gemm reads "
          "the last quantized tensor (step s_in) -- so the table gives the relative error and "
          "the error in units of s_in x max\\|W\\| (one input step through the largest "
          "weight), and passes a row whose error is within one step on every input of that "
          "Gemm (s_in x max_o sum_j \\|W_oj\\|): a loose bound, the relative error is the figure "
          "to read. max \\|board - x86\\|: the same ONNX compiled for x86 and run here. "
          "Fashion-MNIST: the first "
          f"{a.n} test images, batch {a.batch}; int8 calibrated on {a.calib} training images. "
          f"Zoo models: seeded random weights (no pretrained ones, so no accuracy), "
          f"{a.zoo_images} seeded normal images, int8 calibrated on {ZOO_CALIB} seeded normal "
          "images. No tuning database.\n")
    print("**EMULATED s/call** is wall time per call on qemu user mode (one thread, RPC "
          "included): instruction-by-instruction emulation on an x86 core, ~50-100x slower "
          "than a board; it says nothing about a Cortex-A72 (rpi4) or Cortex-A76 (rpi5).\n")
    print("| model | target | precision | kernels | error | pass | top-1 agreement | "
          "accuracy board / x86 / ort | max \\|board - x86\\| | EMULATED s/call (batch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "compile_error" in r:
            print(f"| {r['model']} | {r['target']} | {r['precision']} | compile failed | "
                  f"{r['compile_error'].replace('|', '/')} | **FAIL** | - | - | - | - |")
            continue
        if r["metric"] == "steps":
            unit = (f"{r['error']:.3g} output steps (step {r['step']:.3g}; "
                    f"{100 * r['frac_diff']:.2f}% of values differ)")
        elif r.get("loose"):
            unit = (f"{r['error']:.2e} {r['metric']} = {r['in_steps']:.2f} input steps x "
                    f"max\\|W\\| ({100 * r['frac_diff']:.1f}% of values differ)")
        else:
            unit = f"{r['error']:.2e} {r['metric']}"
        ok = ("pass*" if r.get("loose") else "pass") if r["ok"] else "**FAIL**"
        vs86 = (f"{r['board_vs_x86_maxdiff']:.2g}" if "board_vs_x86_maxdiff" in r else "-")
        acc = (f"{100 * r['acc_board']:.2f}% / {100 * r['acc_x86']:.2f}% / "
               f"{100 * r['acc_ort']:.2f}%" if "acc_board" in r else "n/a (random weights)")
        print(f"| {r['model']} | {r['target']} | {r['precision']} | {r['kernels']} | {unit} | "
              f"{ok} | {100 * r['top1_agree']:.1f}% | {acc} | {vs86} | "
              f"{r['emulated_s_per_call']:.2f} ({r['call_batch']}) |")
    print(f"\n{len(rows) - n_fail}/{len(rows)} within bounds; total {total / 60:.1f} min on "
          f"{os.cpu_count()} CPUs (compiles overlapped with the board).")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import main_recorded

    sys.exit(main_recorded(
        "board", "aarch64 artifacts on the emulated board (qemu user mode)", main))
