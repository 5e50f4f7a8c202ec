"""``--max-drop --objective latency``: the fastest compiled model within a budget.

    python benchmarks/search_latency.py [--models fashion_cnn,resnet18,mobilenet_v2]
                                        [--max-drop 1.0]
                                        [--minutes 10] [--passes prune,lowrank,sparse,quantize]
                                        [--calib 300] [--val 500] [--judge 1000] [--no-record]

``fashion_cnn`` is the bundled trained CNN (batch 1; calibration: 2000 training images,
validation: test images 0-1999, judged: the other 8000). The zoo models are torchvision's
with random (seeded) convolution weights, their BatchNorm statistics and a linear 10-class
head fit on 1000 training pictures (``zoo.build_on_data``: plain random weights give one
top-1 class for every picture, which makes agreement meaningless). The score is top-1
agreement with that original model; ``--max-drop`` bounds the disagreement in points. Images
are real: Fashion-MNIST pictures upscaled to 224x224 (nearest, x8) on three channels,
ImageNet-normalized -- calibration from the training split, validation (what the search scores
on) and the judged rows (what it never saw) from disjoint parts of the test split.

Printed per model: the search (configurations, wall time, its time budget), the chosen
settings, the disagreement of the *compiled* chosen model with the original on the judged rows,
and the speed-up over the dense fp32 model compiled by edgec -- both libraries re-timed at the
end in alternating rounds, each in its own fresh process (median), batch 1, all cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _images(split: str, start: int, n: int) -> np.ndarray:
    from models import fashion_mnist

    px, _ = fashion_mnist.load_raw(split)
    x = px[start:start + n].astype(np.float32) / 255.0
    x = np.repeat(np.repeat(x, 8, axis=1), 8, axis=2)[:, None]          # [n, 1, 224, 224]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    return np.ascontiguousarray((np.repeat(x, 3, axis=1) - mean) / std, dtype=np.float32)


def _top1(sess, x: np.ndarray) -> np.ndarray:
    from edgec.runtime import run_batched

    return run_batched(sess, {"input": x}, 1)[0].argmax(1)


def _retime(arts: list[Path], feeds: dict, rounds: int = 3, repeat: int = 10) -> list[float]:
    """Median ms of each artifact, timed in alternating rounds (fresh processes)."""
    from edgec.driver.bench import time_artifact
    from edgec.runtime import default_threads

    times: list[list[float]] = [[] for _ in arts]
    for _ in range(rounds):
        for i, a in enumerate(arts):
            times[i] += time_artifact(a, feeds, default_threads(), repeat, 3)
    return [float(np.median(t) * 1e3) for t in times]


def one(name: str, a, work: Path) -> dict:
    import onnx

    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.driver.search import run_search
    from edgec.models import zoo
    from edgec.runtime import OrtSession, Session

    from models import fashion_mnist

    _, yte = fashion_mnist.load_raw("test")
    shapes = {}
    if name == "fashion_cnn":  # the bundled *trained* CNN, batch 1, its own normalization
        src = ROOT / "models" / "fashion_mnist_cnn.onnx"
        shapes = {"input": (1, 1, 28, 28)}
        xt, _ = fashion_mnist.load("test")
        xc = fashion_mnist.load("train", 2000)[0]
        nv, nj = 2000, 8000
        xv, xj = xt[:nv], xt[nv:nv + nj]
    else:
        src = work / f"{name}.onnx"
        _, ytr = fashion_mnist.load_raw("train")
        onnx.save(zoo.build_on_data(name, _images("train", 0, 1000), ytr[:1000]), src)
        xc = _images("train", 0, a.calib)
        nv, nj = a.val, a.judge
        xv = _images("test", 0, nv)
        xj = _images("test", nv, nj)
    orig = OrtSession(onnx.load(src))
    ref_v = _top1(orig, xv)
    # how stable the random model itself is: top-1 agreement under 1 % Gaussian input noise
    # (a compression that perturbs the activations as much cannot stay within a point)
    noise = np.random.default_rng(0).standard_normal(xv[:200].shape).astype(np.float32)
    stable = 100 * float(np.mean(_top1(orig, xv[:200] + 0.01 * noise) == ref_v[:200]))
    passes = [s for s in a.passes.split(",") if s]
    out = work / f"{name}.art"
    opts = CompileOptions(passes=passes, calib={"input": xc}, progress=False,
                          input_shapes=shapes)
    t0 = time.perf_counter()
    rep = run_search(src, out, opts, {"input": xv}, a.max_drop, "latency", a.minutes,
                     search_passes=passes)
    wall = time.perf_counter() - t0
    se = rep["search"]
    js = json.loads((out / "search.json").read_text())
    dense = work / f"{name}.dense"
    compile_model(src, dense, CompileOptions(passes=[], progress=False, input_shapes=shapes))
    lib = Session(out)
    ref_j = _top1(orig, xj)
    got_j = _top1(lib, xj)
    y_j = yte[nv:nv + nj]
    d_ms, c_ms = _retime([dense, out], {"input": xj[:1]})
    return {"name": name, "search": se, "frontier": js["frontier"], "wall": wall,
            "val_classes": int(len(np.unique(ref_v))), "stable": stable,
            "judged_disagreement": 100 * float(np.mean(ref_j != got_j)),
            "judged_accuracy": [100 * float(np.mean(ref_j == y_j)),
                                100 * float(np.mean(got_j == y_j))],
            "dense_ms": d_ms, "chosen_ms": c_ms, "rows": (len(xc), nv, nj),
            "plot": (out / "plots" / "tradeoff.png").is_file()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="fashion_cnn,resnet18,mobilenet_v2")
    p.add_argument("--passes", default="prune,lowrank,sparse,quantize")
    p.add_argument("--max-drop", type=float, default=1.0)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--calib", type=int, default=300)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--judge", type=int, default=1000)
    p.add_argument("--keep", help="keep the artifacts (search.json, plots) in this folder")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in [m for m in a.models.split(",") if m]:
            r = one(name, a, work)
            rows.append(r)
            print(f"{name}: done in {r['wall']:.0f} s", file=sys.stderr)
    print(f"search over {a.passes}, --objective latency, --max-drop {a.max_drop} (top-1 "
          f"disagreement with the original), batch 1, search budget {a.minutes:g} min\n")
    print("| model | calib / val / judged rows | configs (timed) | search + compile | chosen | "
          "disagreement val (bound) | "
          "judged, compiled | dense fp32 compiled | chosen | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        se, c = r["search"], r["search"]["chosen"]
        rp = se["reproduce"]
        what = " ".join([",".join(rp["passes"])] + [f"--set {s}" for s in rp["sets"]]) \
            if rp["passes"] else "original"
        print(f"| {r['name']} | {' / '.join(map(str, r['rows']))} | {se['evaluated']} "
              f"({se['timed']['builds']}) | {r['wall']:.0f} s"
              f" ({se['stopped']}) | `{what}` | {c['drop']:.2f} ({c['bound']:.2f}) | "
              f"{r['judged_disagreement']:.2f} | {r['dense_ms']:.2f} ms | {r['chosen_ms']:.2f} ms"
              f" | x{r['dense_ms'] / r['chosen_ms']:.2f} |")
    print()
    for r in rows:
        fr = ", ".join(f"{f['latency_ms']:.2f} ms:{f['drop']:.2f}" for f in r["frontier"])
        print(f"- {r['name']}: frontier (latency : disagreement on val) {fr}; "
              f"plots/tradeoff.png written: {r['plot']}; original's top-1 on val spans "
              f"{r['val_classes']} classes and agrees with itself under 1 % input noise on "
              f"{r['stable']:.1f} % of 200 rows; accuracy on the judged rows (10 Fashion classes"
              + ("" if r["name"] == "fashion_cnn" else ", random features + fit head")
              + f") original {r['judged_accuracy'][0]:.1f} %, chosen "
              f"compiled {r['judged_accuracy'][1]:.1f} %")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import main_recorded

    from _results import arg_value

    def _name(argv):  # one section per budget and model list
        d, m = arg_value(argv, "--max-drop"), arg_value(argv, "--models")
        return "search_latency" + (f"_drop{d}" if d not in (None, "1", "1.0") else "") + \
            (f"_{m.replace(',', '_')}" if m else "")

    def _title(argv):
        return (f"--max-drop {arg_value(argv, '--max-drop') or '1.0'} --objective latency: "
                + (arg_value(argv, "--models") or "the trained Fashion CNN, ResNet-18, "
                   "MobileNetV2") + " (x86)")

    sys.exit(main_recorded(_name, _title, main))
