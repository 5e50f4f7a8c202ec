"""``edgec compile MODEL.onnx``: the model through the passes and a target into an artifact."""

from __future__ import annotations

import sys
from pathlib import Path

from edgec import __version__
from edgec.core.errors import EdgecError

from ._args import (add_board_args, add_pipeline, add_target, add_target_options, board_of,
                    compile_options, human)


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
    s = c.add_argument_group("search (--max-drop)")
    s.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="search the passes' settings for the smallest model whose drop on "
                   "--val stays within POINTS (a confidence bound; needs --calib and --val)")
    s.add_argument("--val", metavar="FILE.npz", help="validation data for --max-drop: one array "
                   "per input, optional 'labels' (else top-1 agreement with the original)")
    s.add_argument("--objective", choices=("macs", "size", "latency"), default="macs",
                   help="what the search minimizes (default macs; latency: each candidate "
                   "within the budget compiled and timed on the target, here or over --rpc)")
    s.add_argument("--search-minutes", type=float, default=10.0, metavar="M",
                   help="time budget of the search (default 10); Ctrl-C keeps the best so far")
    add_board_args(s)
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
    if a.max_drop is None:
        for flag, v in (("--val", a.val), ("--objective", a.objective != "macs" or None),
                        ("--search-minutes", a.search_minutes != 10.0 or None),
                        ("--rpc", a.rpc), ("--key", a.key)):
            if v:
                raise EdgecError(f"{flag} belongs to the search: give --max-drop POINTS too")
        report = compiler.compile_model(a.model, out, opts)
    else:
        from edgec.driver.search import run_search
        from edgec.runtime import load_npz

        if not a.val:
            raise EdgecError("--max-drop needs --val FILE.npz (validation data, kept apart from "
                             "--calib)")
        if a.calib and Path(a.calib).resolve() == Path(a.val).resolve():
            raise EdgecError("--val and --calib are the same file: the budget must be checked "
                             "on data the passes did not fit on")
        if a.preset is not None:
            raise EdgecError("--preset and --max-drop: the search chooses the passes (restrict "
                             "them with --passes)")
        if a.set:
            raise EdgecError("--set and --max-drop: the search chooses the settings")
        report = run_search(a.model, out, opts, load_npz(a.val), a.max_drop, a.objective,
                            a.search_minutes, search_passes=opts.passes, board=board_of(a))
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
              + (f"; {k['concat_views']} concatenation(s) written in place"
                 if k.get("concat_views") else "")
              + (f"; tuning db {k['tuning_db']}" if k.get("tuning_db") else ""))
        rejected = k.get("tuned_rejected") or {}
        if rejected:
            print(f"  warning: {len(rejected)} tuned schedule(s) from the tuning database did "
                  f"not build, default kernels used: {', '.join(sorted(rejected)[:3])}"
                  + (" ..." if len(rejected) > 3 else "") + " (re-tune to replace them)")
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
    se = report.get("search")
    if se:
        c = se["chosen"]
        base = se["base"]
        print(f"  search ({se['metric']}, {se['evaluated']} configurations, {se['seconds']:.0f}s, "
              f"{se['stopped']}): conv+gemm MACs x{base['macs'] / max(c['macs'], 1):.2f} "
              f"(nonzero x{base['macs_effective'] / max(c['macs_effective'], 1):.2f}), model.onnx "
              f"x{base['size'] / max(c['size'], 1):.2f} smaller")
        if c.get("latency_ms") and base.get("latency_ms"):
            t = se.get("timed", {})
            print(f"  latency {base['latency_ms']:.3f} ms -> {c['latency_ms']:.3f} ms "
                  f"(x{base['latency_ms'] / c['latency_ms']:.2f} faster than the original "
                  f"compiled; median on {t.get('where', '?')}, {t.get('builds', '?')} builds)")
        print(f"  drop on --val {c['drop']:.2f} points, upper bound {c['bound']:.2f} <= "
              f"{se['max_drop']} ({100 * se['confidence']:.0f} % one-sided confidence: the "
              "margin); search.json, plots/tradeoff.png")
        r = se["reproduce"]
        print("  reproduce: --passes " + ",".join(r["passes"]) +
              "".join(f" --set {x}" for x in r["sets"]) if r["passes"] else
              "  reproduce: no compressing pass fits the budget (the original model)")
    est = report.get("estimate")
    if est and "disagreement" in est:
        where = (f"{est['rows']} held-out calibration rows" if est.get("held_out") else
                 f"the {est['rows']} calibration rows (under 100: none held out)")
        print(f"  estimated drop: top-1 disagreement with the original {est['disagreement']:.2f} "
              f"% on {where} (90 % bound {est['upper_90']:.2f})")
        if est["upper_90"] > est["budget"] and est.get("default_settings") and not se:
            print(f"  warning: above the default budget of {est['budget']:g} point with default "
                  f"settings of {', '.join(est['default_settings'])}: set them (--set) or search "
                  "with --max-drop and --val")
    elif est:
        print(f"  estimated error: relative output error {est['relative_error']:.3g} on "
              f"{est['rows']} calibration rows")
    t = report["timings"]
    print(f"  total {t.get('total_s', 0):.1f}s (import {t.get('import_s', 0):.1f}s, passes "
          f"{t.get('passes_s', 0):.1f}s, tvm build {t.get('tvm_build_s', 0):.1f}s)")
