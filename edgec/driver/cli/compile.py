"""``edgec compile MODEL.onnx``: the model through the passes and a target into an artifact."""

from __future__ import annotations

import sys
from pathlib import Path

from edgec import __version__
from edgec.core.errors import EdgecError

from ._args import add_pipeline, add_target, add_target_options, compile_options, human


def add_parser(sub) -> None:
    c = sub.add_parser("compile", help="compile an ONNX model into an artifact folder")
    c.add_argument("model")
    add_target(c)
    c.add_argument("-o", "--output", help="artifact folder (default: "
                   "<model folder>/<model stem>.edgec/<target>/)")
    add_pipeline(c)
    c.add_argument("--verify", action="store_true",
                   help="run onnxruntime after every pass; fail naming the pass that drifts")
    add_target_options(c)
    c.add_argument("--no-build", action="store_true",
                   help="run the passes and write model.onnx + report, but no TVM library")
    c.add_argument("--tune-trials", type=int, metavar="N",
                   help="tune with MetaSchedule (N trials in all) before building")
    c.add_argument("--tune-minutes", type=float, metavar="M", help="tuning time budget")
    c.add_argument("--no-tuning-db", action="store_true",
                   help="ignore the target's tuning database (default kernels only)")
    c.set_defaults(fn=run)


def run(a) -> int:
    from edgec.driver import compiler

    if a.output is not None and not a.output.strip():
        raise EdgecError("-o: empty output path")
    out = Path(a.output) if a.output is not None else compiler.default_out_dir(a.model, a.target)
    opts = compile_options(
        a,
        verify=a.verify,
        build=not a.no_build,
        tune_trials=a.tune_trials,
        tune_minutes=a.tune_minutes,
        use_tuning_db=not a.no_tuning_db,
        progress=sys.stderr.isatty(),
    )
    report = compiler.compile_model(a.model, out, opts)
    print_report(report, a.model, out)
    return 0


def print_report(report: dict, model: str, out: Path) -> None:
    b, f = report["before"], report["after"]
    print(f"edgec {__version__}: compiled {model} for {report['target']} -> {out}")
    print(f"  params {human(b['params'])} -> {human(f['params'])}, MACs {human(b['macs'])} -> "
          f"{human(f['macs'])}, weight bytes {human(b['bytes'])} -> {human(f['bytes'])}")
    for p in report["passes"]:
        print(f"  pass {p['name']:<20} rewrote {len(p['rewritten']):>4}, skipped "
              f"{len(p['skipped']):>4}  ({p['seconds']:.2f}s)")
    k = report.get("kernels")
    if k:
        counts = ", ".join(f"{n} {v}" for n, v in sorted(k["counts"].items()))
        print(f"  kernels: {counts or 'none'}; unscheduled {len(k['unscheduled'])}"
              + (f"; tuning db {k['tuning_db']}" if k.get("tuning_db") else ""))
        fb = k.get("fallbacks") or {}
        if fb:
            worst = sorted(fb.items(), key=lambda kv: -kv[1]["macs"])[:3]
            names = ", ".join(f"{n} ({v['kernel']}, {human(v['macs'])} MACs)" for n, v in worst)
            print(f"  warning: {len(fb)} function(s) with {100 * k['fallback_mac_share']:.1f} % "
                  f"of the MACs got no kernel, only a fallback schedule: {names}"
                  + (" ..." if len(fb) > 3 else ""))
        q = k.get("int8")
        if q:
            floats = ", ".join(f"{r} x{n}" for r, n in q["float"].items())
            print(f"  int8 ({q['isa']}): {q['conv2d']} integer convs, {q.get('matmul', 0)} "
                  f"integer matmuls, {q['dwconv2d']} depthwise on 8-bit input"
                  + (f"; left float: {floats}" if floats else ""))
    t = report["timings"]
    print(f"  total {t.get('total_s', 0):.1f}s (import {t.get('import_s', 0):.1f}s, passes "
          f"{t.get('passes_s', 0):.1f}s, tvm build {t.get('tvm_build_s', 0):.1f}s)")
