"""onnxruntime vs edgec on the zoo, measured in the same run.

    python benchmarks/zoo_bench.py [--models resnet18,mobilenet_v2,efficientnet_b0,fashion_cnn]
                                   [--threads 2] [--repeat 30] [--tune-minutes M] [--json FILE]
                                   [--no-record]
    python benchmarks/zoo_bench.py --models broad      # the broad zoo: zoo.broad_names()

For each model: compile with the default kernels only (no tuning database), then -- with
``--tune-minutes`` -- tune for that budget into a private cache and compile again. Each
artifact is timed by ``edgec.driver.bench.bench`` (same inputs, same thread count as onnxruntime,
medians). Prints onnxruntime ms, edgec ms, the ratio onnxruntime/edgec (> 1: edgec faster),
GFLOP/s and % of the sgemm peak measured in the same run (edgec.driver.bench.sgemm_peak_gflops),
the compile time, and the max relative error of edgec's output against onnxruntime's (max abs
error / max |reference|, on the bench's seeded input, ``edgec.runtime.Session`` on the compiled
artifact vs ``OrtSession`` on the exported model; above 1e-4 it is flagged). Ends with the
geometric mean of the ratios. ``--models`` takes zoo names (``broad``: every model of
``zoo.broad_names()``, the classifiers and dense models of issue 22; ``default``: the four
above) in any mix; a model that fails to export, compile or run is a finding: it is reported
with its error (a row with ``error`` in ``--json``), the others go on, and the table is still
recorded.

With ``--mcpu`` naming an x86 family older than the host (``haswell`` on an AVX-512 host),
onnxruntime runs as on that family -- the extensions it lacks hidden from CPUID in its
process (:mod:`edgec.driver.cpumask`), so its kernels are the ones such a machine runs -- and
the ratio is against that run; onnxruntime on the host's kernels is timed too and shown beside
it (``ort host ms``, ``ort host/edgec``). ``--peer-cpu host`` keeps onnxruntime on the host's
kernels for the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT = "resnet18,mobilenet_v2,efficientnet_b0,fashion_cnn"
REL_TOL = 1e-4


def model_names(spec: str) -> list[str]:
    """``--models``: comma-separated zoo names, ``broad`` and ``default`` expanded."""
    from edgec.models import zoo

    out = []
    for n in (x.strip() for x in spec.split(",")):
        group = {"broad": zoo.broad_names(), "default": DEFAULT.split(",")}.get(n, [n] if n else [])
        for g in group:
            if g not in zoo.names():
                raise SystemExit(f"unknown zoo model {g!r}; known: {', '.join(zoo.names())}, "
                                 "broad, default")
            if g not in out:
                out.append(g)
    return out


def max_rel_error(src: Path, artifact: Path, threads: int) -> float:
    """max |edgec - onnxruntime| / max |onnxruntime| on the bench's seeded input."""
    import numpy as np

    from edgec.core.importer import load_model, normalize, random_feeds
    from edgec.runtime import OrtSession, Session
    from edgec.runtime.artifact import read_manifest

    shapes = {i["name"]: tuple(i["shape"]) for i in read_manifest(artifact)["inputs"]}
    ref_model, _ = normalize(load_model(src), shapes)
    feeds = random_feeds(ref_model, seed=0)  # what edgec.driver.bench.bench feeds both runtimes
    ref = OrtSession(src, num_threads=threads).run(None, feeds)
    got = Session(artifact, num_threads=threads).run(None, feeds)
    worst = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            return math.inf
        scale = float(np.abs(r).max(initial=0.0)) or 1.0
        worst = max(worst, float(np.abs(r - g).max(initial=0.0)) / scale)
    return worst if math.isfinite(worst) else math.inf


def geomean(xs) -> float | None:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=DEFAULT,
                   help="comma-separated zoo names; 'broad': the broad zoo, 'default': "
                        + DEFAULT)
    p.add_argument("--target", default="x86")
    p.add_argument("--mcpu", help="LLVM CPU for edgec's build (e.g. haswell: AVX2 kernels on "
                   "an AVX-512 host; onnxruntime runs as on that CPU where the host can mask "
                   "CPUID, see --peer-cpu)")
    p.add_argument("--peer-cpu", choices=("mcpu", "host"), default="mcpu",
                   help="onnxruntime's CPU for the ratio: 'mcpu' (default: as on the --mcpu "
                   "family, where CPUID faulting allows; its host-kernel time is shown too) or "
                   "'host'")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tune-minutes", type=float)
    p.add_argument("--json")
    a = p.parse_args(argv)

    from edgec.driver.bench import bench, sgemm_peak_gflops
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.models import zoo

    from edgec.driver import cpumask

    names = model_names(a.models)
    peer = None
    if a.mcpu and a.peer_cpu == "mcpu":
        why = cpumask.supported() if a.mcpu in cpumask.FAMILIES else \
            f"no CPUID mask for {a.mcpu}"
        if why:
            print(f"onnxruntime keeps the host's kernels: {why}", flush=True)
        else:
            peer = a.mcpu
    peak = sgemm_peak_gflops(a.threads)
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGEC_CACHE"] = str(Path(tmp) / "cache")
        for name in names:
            src = Path(tmp) / f"{name}.onnx"
            stage = "export"
            try:
                zoo.export(name, src, seed=0, batch=a.batch)
                stage = "compile"
                t0 = time.perf_counter()
                compile_model(src, Path(tmp) / name, CompileOptions(
                    target=a.target, use_tuning_db=False,
                    target_options={"mcpu": a.mcpu} if a.mcpu else {}))
                compile_s = time.perf_counter() - t0
                stage = "bench"
                r = bench(src, Path(tmp) / name, threads=a.threads, repeat=a.repeat, peak=False,
                          peer_cpu=peer)
                r.update(model=name, compile_s=compile_s, sgemm_peak_gflops=peak)
                stage = "accuracy"
                r["max_rel_err"] = max_rel_error(src, Path(tmp) / name, a.threads)
            except Exception as e:  # noqa: BLE001 - a failing model is a finding, not the end
                msg = " ".join(str(e).split())[:300] or type(e).__name__
                failed.append({"model": name, "stage": stage,
                               "error": f"{type(e).__name__}: {msg}"})
                print(f"{name:<26} FAILED at {stage}: {type(e).__name__}: {msg}", flush=True)
                if os.environ.get("EDGEC_BENCH_TRACEBACK"):
                    traceback.print_exc()
                continue
            if a.tune_minutes:
                t0 = time.perf_counter()
                rep = compile_model(src, Path(tmp) / f"{name}-tuned", CompileOptions(
                    target=a.target, tune_minutes=a.tune_minutes, progress=False))
                r["tune_s"] = time.perf_counter() - t0
                r["tuned_tasks"] = rep["kernels"]["counts"].get("tuned", 0)
                rt = bench(src, Path(tmp) / f"{name}-tuned", threads=a.threads,
                           repeat=a.repeat, peak=False, peer_cpu=peer)
                r["tuned_ms"] = rt["edgec_ms"]
                r["tuned_ratio"] = rt["onnxruntime_ms"] / rt["edgec_ms"]
            rows.append(r)
            print(f"{name:<26} ort {r['onnxruntime_ms']:8.2f} ms  edgec {r['edgec_ms']:8.2f} ms  "
                  f"ratio {r['ratio']:.3f}  rel err {r['max_rel_err']:.1e}  compile "
                  f"{compile_s:.0f} s" + (f"  tuned {r['tuned_ms']:8.2f} ms ratio "
                                               f"{r['tuned_ratio']:.3f}" if a.tune_minutes
                                               else ""), flush=True)
    print(f"\n{a.threads} threads, batch {a.batch}, target {a.target}"
          + (f" -mcpu {a.mcpu}" + (f" (onnxruntime as on a {peer} CPU: AVX-512/VNNI/AMX "
                                   "hidden from its CPUID)" if peer else
                                   " (onnxruntime: the host's kernels)") if a.mcpu else "")
          + "; sgemm peak "
          f"{peak:.1f} GFLOP/s" + (f"; tuning budget {a.tune_minutes} min/model"
                                   if a.tune_minutes else ""))
    head = (f"{'model':<26} {'GMAC':>6} {'ort ms':>8} {'edgec ms':>9} {'ort/edgec':>9} "
            f"{'ort GF/s':>8} {'edgec GF/s':>10} {'ort %pk':>7} {'edgec %pk':>9} "
            f"{'max rel err':>11} {'compile s':>9}")
    if a.tune_minutes:
        head += f" {'tuned ms':>9} {'ort/tuned':>9}"
    if peer:
        head += f" {'ort host ms':>11} {'ort host/edgec':>14}"
    print(head)
    for r in rows:
        flag = "!" if not r["max_rel_err"] <= REL_TOL else " "
        line = (f"{r['model']:<26} {r['macs_original'] / 1e9:6.3f} {r['onnxruntime_ms']:8.2f} "
                f"{r['edgec_ms']:9.2f} {r['ratio']:9.3f} {r['onnxruntime_gflops']:8.1f} "
                f"{r['edgec_gflops']:10.1f} {100 * r['onnxruntime_gflops'] / peak:6.1f}% "
                f"{100 * r['edgec_gflops'] / peak:8.1f}% {r['max_rel_err']:10.1e}{flag} "
                f"{r['compile_s']:9.1f}")
        if a.tune_minutes:
            line += f" {r['tuned_ms']:9.2f} {r['tuned_ratio']:9.3f}"
        if peer:
            line += (f" {r['onnxruntime_host_ms']:11.2f} "
                     f"{r['onnxruntime_host_ms'] / r['edgec_ms']:14.3f}")
        print(line)
    for f in failed:
        print(f"{f['model']:<26} FAILED at {f['stage']}: {f['error']}")
    g = geomean(r["ratio"] for r in rows)
    if g is not None:
        print(f"\ngeometric mean ort/edgec over {len(rows)} model(s): {g:.3f}"
              + (f"; tuned: {geomean(r['tuned_ratio'] for r in rows):.3f}"
                 if a.tune_minutes else "")
              + (f"; against onnxruntime on the host's kernels: "
                 f"{geomean(r['onnxruntime_host_ms'] / r['edgec_ms'] for r in rows):.3f}"
                 if peer else ""))
    bad = [r["model"] for r in rows if not r["max_rel_err"] <= REL_TOL]
    if bad:
        print(f"max relative error above {REL_TOL:g} (!): {', '.join(bad)}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows + failed, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from _results import arg_value, main_recorded

    sys.exit(main_recorded(
        lambda a: "zoo_bench" + (f"-{arg_value(a, '--mcpu')}" if arg_value(a, "--mcpu")
                                 else "") + ("-tuned" if arg_value(a, "--tune-minutes") else ""),
        lambda a: "Zoo: onnxruntime vs edgec, fp32" + (", tuned" if arg_value(
            a, "--tune-minutes") else ", untuned") + (
            f", edgec built for -mcpu {arg_value(a, '--mcpu')}" if arg_value(a, "--mcpu")
            else ""), main))
