"""Sparse kernels: speed against density, the break-even densities, and the issue's goals.

    nice -n 19 python benchmarks/sparse_bench.py [--threads 2] [--repeat 50] [--mcpu CPU]
                                                 [--no-models] [--no-record]
    nice -n 19 python benchmarks/sparse_bench.py --calibrate [--isa avx512,avx2]

Default run (section ``sparse_bench`` of docs/results.md):

1. one layer, batch 1: Gemm 784->500 and a 1x1 conv 256->256 at 28x28 (and a 3x3 conv
   64->64 at 28x28), magnitude-masked random weights at densities from 1/25 to 0.7,
   unstructured and in blocks of 4 output channels: edgec's sparse kernel
   (``EDGEC_SPARSE=sparse``) against edgec's dense kernel for the same layer
   (``EDGEC_SPARSE=dense``), both timed here in one process by the TVM runtime (medians);
   onnxruntime on the dense layer in its own process (``edgec.driver.bench``);
2. MobileNetV2 (zoo, random weights) with its groups=1 convolutions at density 0.1
   (``--passes sparse``, magnitude, unstructured and blocks of 4): dense edgec fp32,
   sparse edgec and onnxruntime on the dense model (``edgec.driver.bench``, fresh processes);
3. ``model.so`` sizes of the Fashion-MNIST CNN at densities 1.0 and 0.1.

``--calibrate`` measures the break-even density per ISA (``avx512``: the host, when it has
AVX-512; ``avx2``: ``-mcpu haswell``) and shape class (two shapes per class; the lower
break-even kept, so a layer is sparse only where the sparse kernel wins on both) and
writes ``targets/cpu/kernels/sparse_breakeven.json``, which the compiler reads.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import host, main_recorded  # noqa: E402

DENSITIES = [0.04, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7]
# class -> shapes: ("conv", cin, cout, k, hw) / ("gemm", k, n)
CLASSES = {"conv1x1": [("conv", 256, 256, 1, 28), ("conv", 160, 960, 1, 7)],
           "convkxk": [("conv", 64, 64, 3, 28), ("conv", 256, 256, 3, 14)],
           "gemm": [("gemm", 784, 500), ("gemm", 1024, 1024)]}


def layer_model(shape, density: float, block: int, seed: int = 0):
    """One layer (bias, ReLU after), random weights, the smallest magnitudes zeroed to
    ``density`` (per block of ``block`` output channels)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if shape[0] == "conv":
        _, cin, cout, k, hw = shape
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[k // 2] * 4)
        xs, ys = [1, cin, hw, hw], [1, cout, hw, hw]
    else:
        _, kd, n = shape
        w = (rng.standard_normal((n, kd)) / np.sqrt(kd)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
        xs, ys = [1, kd], [1, n]
    w = magnitude(w, density, block)
    b = rng.standard_normal(w.shape[0]).astype(np.float32) * 0.1
    g = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["z"])], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ys)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def magnitude(w: np.ndarray, density: float, block: int) -> np.ndarray:
    """``w`` with all but the ``density`` largest-magnitude taps zeroed (per block of rows:
    the taps with the largest summed magnitude over the block)."""
    if density >= 1.0:
        return w
    o = w.shape[0]
    flat = w.reshape(o, -1)
    nb = -(-o // block)
    pad = np.zeros((nb * block, flat.shape[1]), np.float32)
    pad[:o] = np.abs(flat)
    score = pad.reshape(nb, block, -1).sum(1)
    keep = max(1, int(round(density * score.size)))
    thr = np.partition(score.reshape(-1), score.size - keep)[score.size - keep]
    mask = np.repeat(score >= thr, block, axis=0)[:o]
    return (flat * mask).reshape(w.shape).astype(np.float32)


def _compile(model, out: Path, mode: str, mcpu: str | None, passes=None, settings=None,
             shapes=None):
    """Compile for x86 (``mcpu``: the host's CPU when None) with ``EDGEC_SPARSE=mode``
    (``""``: the break-even decides); ``settings``: ``--set`` pairs."""
    from edgec.driver.compiler import CompileOptions, compile_model

    src = out.parent / f"{out.name}.onnx"
    import onnx

    onnx.save(model, src)
    os.environ["EDGEC_SPARSE"] = mode
    try:
        return compile_model(src, out, CompileOptions(
            target="x86", target_options={"mcpu": mcpu} if mcpu else {},
            passes=passes or [], sets=[f"{k}={v}" for k, v in (settings or {}).items()],
            input_shapes=shapes or {}, progress=False))
    finally:
        os.environ.pop("EDGEC_SPARSE", None)


def _timers(artifacts: list[Path], repeat: int) -> list[float]:
    """Median seconds per run of each artifact, by the TVM runtime in this process: the
    artifacts timed in turn for 3 rounds (load from elsewhere hits all alike), each
    artifact's fastest round median kept."""
    from edgec.runtime import Session

    timers = []
    for art in artifacts:
        sess = Session(art)
        rng = np.random.default_rng(0)
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32)
                 for i in sess.input_specs}
        timers.append(sess.timer(feeds, number=max(1, repeat // 10)))
    best = [float("inf")] * len(timers)
    for _ in range(3):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], float(np.median([timer() for _ in range(10)])))
    return best


def sweep(shape, mcpu, repeat, tmp: Path, densities=DENSITIES, blocks=(1, 4)):
    """``{block: [(density, dense_s, sparse_s)]}`` for one layer shape."""
    tag = "_".join(map(str, shape))
    dense_dir = tmp / f"dense_{tag}"
    _compile(layer_model(shape, 1.0, 1), dense_dir, "dense", mcpu)
    arts = {}
    for block in blocks:
        for d in densities:
            art = tmp / f"sp_{tag}_{block}_{d}"
            report = _compile(layer_model(shape, d, block), art, "sparse", mcpu)
            (layer,) = report["kernels"]["structured"]
            assert layer["kernel"] == "sparse", layer
            arts[block, d] = art
    times = _timers([dense_dir, *arts.values()], repeat)
    dense, sparse = times[0], dict(zip(arts, times[1:]))
    return {block: [(d, dense, sparse[block, d]) for d in densities] for block in blocks}


def crossing(rows) -> float:
    """The density where the sparse kernel stops winning (log-linear interpolation of the
    speed-up between the measured densities); the last density if it always wins."""
    prev = None
    for d, dense, sparse in rows:
        s = dense / sparse
        if s < 1.0:
            if prev is None:
                return d / 2
            (d0, s0) = prev
            t = np.log(s0) / (np.log(s0) - np.log(s))
            return float(d0 + t * (d - d0))
        prev = (d, s)
    return float(rows[-1][0])


ISA_MCPU = {"avx512": None, "avx2": "haswell"}


def calibrate(isas, repeat: int) -> int:
    table = json.loads(_breakeven_file().read_text()) if _breakeven_file().is_file() else {}
    table.setdefault("isa", {})
    for isa in isas:
        mcpu = ISA_MCPU[isa]
        if isa == "avx512" and "avx512f" not in Path("/proc/cpuinfo").read_text():
            print(f"{isa}: this host has no AVX-512, not measured")
            continue
        entry = {"host": host(), "mcpu": mcpu or "host", "shapes": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for cls, shapes in CLASSES.items():
                found = {"unstructured": [], "block": []}
                for shape in shapes:
                    res = sweep(shape, mcpu, repeat, Path(tmp))
                    for block, rows in res.items():
                        key = "block" if block > 1 else "unstructured"
                        be = crossing(rows)
                        found[key].append(be)
                        speed = " ".join(f"{d:g}:{dn / sp:.2f}x" for d, dn, sp in rows)
                        print(f"{isa} {cls} {shape} block {block}: break-even {be:.2f}  "
                              f"[{speed}]")
                        entry["shapes"]["/".join(map(str, shape)) + f"/b{block}"] = \
                            [[d, round(dn / sp, 3)] for d, dn, sp in rows]
                entry[cls] = {k: round(min(v), 3) for k, v in found.items()}
        table["isa"][isa] = entry
    table["fallback"] = {cls: {k: min(table["isa"][i][cls][k] for i in table["isa"])
                               for k in ("unstructured", "block")} for cls in CLASSES}
    table["fallback_source"] = ("the lowest break-even measured on x86 (" +
                                ", ".join(sorted(table["isa"])) + "); no hardware of this "
                                "ISA was at hand")
    _breakeven_file().write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {_breakeven_file().relative_to(ROOT)}")
    return 0


def _breakeven_file() -> Path:
    from edgec.targets.cpu.kernels.sparse import BREAKEVEN_FILE

    return BREAKEVEN_FILE


def layers_table(mcpu, repeat: int, threads: int, tmp: Path) -> None:
    from edgec.driver.bench import bench

    print("### One layer, batch 1: sparse kernel against the dense kernel (edgec)\n")
    print(f"threads {threads}; speed-up = dense edgec ms / sparse edgec ms (same process); "
          "ORT/edgec: onnxruntime on the dense layer / sparse edgec\n")
    print("| layer | block | " + " | ".join(f"d={d:g}" for d in DENSITIES) +
          " | break-even | dense edgec ms | onnxruntime ms |")
    print("|---|---|" + "---|" * (len(DENSITIES) + 3))
    for shape in (CLASSES["gemm"][0], CLASSES["conv1x1"][0], CLASSES["convkxk"][0]):
        res = sweep(shape, mcpu, repeat, tmp)
        dense_model = layer_model(shape, 1.0, 1)
        src = tmp / "ort_dense.onnx"
        import onnx

        onnx.save(dense_model, src)
        _compile(dense_model, tmp / "ort_dense_art", "dense", mcpu)
        ort_ms = bench(src, tmp / "ort_dense_art", threads=threads, repeat=repeat,
                       peak=False)["onnxruntime_ms"]
        name = (f"Gemm {shape[1]}->{shape[2]}" if shape[0] == "gemm" else
                f"Conv {shape[3]}x{shape[3]} {shape[1]}->{shape[2]} @{shape[4]}x{shape[4]}")
        for block, rows in res.items():
            cells = [f"{dn / sp:.2f}x" for d, dn, sp in rows]
            print(f"| {name} | {block} | " + " | ".join(cells) +
                  f" | {crossing(rows):.2f} | {rows[0][1] * 1e3:.3f} | {ort_ms:.3f} |")
        d04 = res[1][0]
        print(f"\n{name}, density 1/25, unstructured: {d04[1] / d04[2]:.2f}x the dense "
              f"kernel, {ort_ms / (d04[2] * 1e3):.2f}x onnxruntime (dense)\n")


def models_table(mcpu, repeat: int, threads: int, tmp: Path) -> None:
    import onnx

    from edgec.driver.bench import bench
    from models import zoo

    print("### MobileNetV2 (random weights), groups=1 convolutions at density 0.1\n")
    src = tmp / "mnv2.onnx"
    zoo.export("mobilenet_v2", src)
    rows = []
    dense = _compile(onnx.load(src), tmp / "mnv2_dense", "", mcpu)
    r = bench(src, tmp / "mnv2_dense", threads=threads, repeat=repeat, peak=False)
    base = r["edgec_ms"]
    rows.append(("dense (no pass)", r["onnxruntime_ms"], r["edgec_ms"], dense))
    for pattern, extra in (("unstructured", {}), ("block", {"block": "4"})):
        settings = {"sparse.density": "0.1", "sparse.pattern": pattern,
                    **{f"sparse.{k}": v for k, v in extra.items()}}
        art = tmp / f"mnv2_{pattern}"
        rep = _compile(onnx.load(src), art, "", mcpu, passes=["sparse"], settings=settings)
        r = bench(src, art, threads=threads, repeat=repeat, peak=False)
        rows.append((f"sparse 0.1 {pattern}", r["onnxruntime_ms"], r["edgec_ms"], rep))
    print("| model | onnxruntime ms (dense model) | edgec ms | edgec dense / this | "
          "ORT / edgec | sparse layers | model.so MB |")
    print("|---|---|---|---|---|---|---|")
    for name, ort, ms, rep in rows:
        layers = rep["kernels"].get("structured", [])
        n_sp = sum(1 for x in layers if x["kernel"] == "sparse")
        so = (tmp / {"dense (no pass)": "mnv2_dense"}.get(name, f"mnv2_{name.split()[-1]}")
              / "model.so").stat().st_size
        print(f"| {name} | {ort:.2f} | {ms:.2f} | {base / ms:.2f}x | {ort / ms:.2f} | "
              f"{n_sp} | {so / 1e6 if so else float('nan'):.2f} |")
    print()


def fashion_sizes(mcpu, tmp: Path) -> None:
    import onnx

    print("### Library size: the Fashion-MNIST CNN\n")
    src = ROOT / "models" / "fashion_mnist_cnn.onnx"
    sizes = {}
    for d in (1.0, 0.1):
        art = tmp / f"fashion_{d}"
        settings = {"sparse.density": str(d), "sparse.min_weights": "0"} if d < 1 else {}
        _compile(onnx.load(src), art, "", mcpu, passes=["sparse"] if d < 1 else [],
                 settings=settings, shapes={"input": (1, 1, 28, 28)})
        sizes[d] = (art / "model.so").stat().st_size
    print(f"model.so: dense {sizes[1.0] / 1e3:.0f} kB, density 0.1 {sizes[0.1] / 1e3:.0f} kB "
          f"({sizes[0.1] / sizes[1.0]:.2f}x)\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--isa", default="avx512,avx2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--mcpu", default=None)
    p.add_argument("--no-models", action="store_true")
    a = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    if a.calibrate:
        return calibrate(a.isa.split(","), a.repeat)
    print(f"host: {host()}; target x86{' -mcpu ' + a.mcpu if a.mcpu else ''}\n")
    with tempfile.TemporaryDirectory() as tmp:
        layers_table(a.mcpu, a.repeat, a.threads, Path(tmp))
        if not a.no_models:
            models_table(a.mcpu, a.repeat, a.threads, Path(tmp))
            fashion_sizes(a.mcpu, Path(tmp))
    return 0


def _mcpu(argv):
    from _results import arg_value

    return arg_value(argv, "--mcpu")


if __name__ == "__main__":
    if "--calibrate" in sys.argv:
        sys.exit(main())
    sys.exit(main_recorded(lambda argv: "sparse_bench" + ("-" + a if (a := _mcpu(argv)) else ""),
                           "Sparse kernels", main))
