"""The ``edgec`` command line.

    edgec compile MODEL.onnx [--target x86] [-o OUT] [--passes a,b | --preset NAME]
                  [--set pass.key=value ...] [--calib FILE.npz] [--input-shape NAME=1x3x224x224]
                  [--verify] [--cuda-arch sm_87]
    edgec run OUT --data inputs.npz -o outputs.npz
    edgec check MODEL.onnx OUT --data val.npz [--max-drop 1.0] [--json FILE]
    edgec bench MODEL.onnx OUT [--threads N]
    edgec passes | edgec targets

User errors print one line on stderr and exit 2; a failed check exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgec import __version__
from edgec.core.errors import EdgecError


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _target_options(a) -> dict:
    return {k: v for k, v in (("cuda_arch", a.cuda_arch), ("mcpu", a.mcpu)) if v}


def cmd_compile(a) -> int:
    from edgec.driver.compiler import CompileOptions, compile_model, default_out_dir
    from edgec.core.importer import parse_input_shapes
    from edgec.runtime import load_npz

    if a.output is not None and not a.output.strip():
        raise EdgecError("-o: empty output path")
    out = Path(a.output) if a.output is not None else default_out_dir(a.model, a.target)
    target_options = _target_options(a)
    opts = CompileOptions(
        target=a.target,
        passes=_csv(a.passes) if a.passes is not None else None,
        preset=a.preset,
        sets=a.set or [],
        input_shapes=parse_input_shapes(a.input_shape),
        calib=load_npz(a.calib) if a.calib else None,
        verify=a.verify,
        target_options=target_options,
        build=not a.no_build,
        tune_trials=a.tune_trials,
        tune_minutes=a.tune_minutes,
        use_tuning_db=not a.no_tuning_db,
        progress=sys.stderr.isatty(),
    )
    report = compile_model(a.model, out, opts)
    b, f = report["before"], report["after"]
    print(f"edgec {__version__}: compiled {a.model} for {report['target']} -> {out}")
    print(f"  params {_human(b['params'])} -> {_human(f['params'])}, MACs {_human(b['macs'])} -> "
          f"{_human(f['macs'])}, weight bytes {_human(b['bytes'])} -> {_human(f['bytes'])}")
    for p in report["passes"]:
        print(f"  pass {p['name']:<20} rewrote {len(p['rewritten']):>4}, skipped "
              f"{len(p['skipped']):>4}  ({p['seconds']:.2f}s)")
    k = report.get("kernels")
    if k:
        counts = ", ".join(f"{n} {v}" for n, v in sorted(k["counts"].items()))
        print(f"  kernels: {counts or 'none'}; unscheduled {len(k['unscheduled'])}"
              + (f"; tuning db {k['tuning_db']}" if k.get("tuning_db") else ""))
        q = k.get("int8")
        if q:
            floats = ", ".join(f"{r} x{n}" for r, n in q["float"].items())
            print(f"  int8 ({q['isa']}): {q['conv2d']} integer convs, {q.get('matmul', 0)} "
                  f"integer matmuls, {q['dwconv2d']} depthwise on 8-bit input"
                  + (f"; left float: {floats}" if floats else ""))
    t = report["timings"]
    print(f"  total {t.get('total_s', 0):.1f}s (import {t.get('import_s', 0):.1f}s, passes "
          f"{t.get('passes_s', 0):.1f}s, tvm build {t.get('tvm_build_s', 0):.1f}s)")
    return 0


def cmd_run(a) -> int:
    import numpy as np

    from edgec.runtime import Session, load_npz, run_batched

    out = Path(a.output)
    if not a.output.strip() or out.is_dir():
        raise EdgecError(f"-o must name an .npz file, not a folder: '{a.output}'")
    sess = Session(a.artifact, num_threads=a.threads)
    data = load_npz(a.data)
    data.pop("labels", None)
    if not data:
        raise EdgecError(f"{a.data} holds no input arrays")
    outs = run_batched(sess, data, sess.batch)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    try:
        np.savez(tmp, **dict(zip(sess.output_names, outs)))
        os.replace(tmp, out)
    except OSError as e:
        raise EdgecError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {len(outs)} output(s) for {next(iter(data.values())).shape[0]} samples to {out}")
    return 0


def cmd_check(a) -> int:
    from edgec.driver.check import check, format_table

    res = check(a.model, a.artifact, a.data, max_drop=a.max_drop, min_cosine=a.min_cosine,
                atol=a.atol, rtol=a.rtol, min_top1=a.min_top1, limit=a.limit,
                threads=a.threads, output=a.output)
    print(format_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["ok"] else 1


def cmd_bench(a) -> int:
    from edgec.driver.bench import bench, format_bench

    res = bench(a.model, a.artifact, threads=a.threads, repeat=a.repeat)
    print(format_bench(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_tune(a) -> int:
    from edgec.driver.compiler import CompileOptions, prepare
    from edgec.core.importer import parse_input_shapes
    from edgec.runtime import load_npz
    from edgec.targets import get_target

    spec = get_target(a.target)
    target_options = _target_options(a)
    from edgec.targets import tuning

    if a.export_file:
        path = tuning.export_db(spec, a.export_file, target_options)
        print(f"exported the {spec.name} tuning database to {path}")
        return 0
    if a.import_file:
        n = tuning.import_db(spec, a.import_file, target_options)
        print(f"imported {n} tuning records into {tuning.db_dir(spec, target_options)}")
        return 0
    if not a.model:
        raise EdgecError("edgec tune needs a MODEL (or --export/--import FILE)")
    opts = CompileOptions(
        target=a.target, passes=_csv(a.passes) if a.passes is not None else None,
        preset=a.preset, sets=a.set or [], input_shapes=parse_input_shapes(a.input_shape),
        calib=load_npz(a.calib) if a.calib else None, target_options=target_options)
    prep = prepare(a.model, opts)
    from edgec.targets import backend

    backend.check_supported(prep.result.model)
    summary = tuning.tune(prep.result.model, spec, target_options, trials=a.trials,
                          minutes=a.minutes, progress=not a.no_progress)
    print(f"tuned {summary['tasks']} tasks for {spec.name}; database {summary['db']}"
          + (f" ({summary['stopped']})" if summary.get("stopped") else ""))
    for name, c in summary["choices"].items():
        d = f"{c['default_s'] * 1e3:.3f} ms" if c.get("default_s") else "n/a"
        t = f"{c['tuned_s'] * 1e3:.3f} ms" if c.get("tuned_s") else "n/a"
        print(f"  {name:<48} default {d:>11}  tuned {t:>11}  -> {c['use']}")
    return 0


def cmd_data(a) -> int:
    from edgec.models import fashion_mnist

    if a.dataset != "fashion-mnist":
        raise EdgecError(f"unknown dataset '{a.dataset}' (known: fashion-mnist)")
    try:
        path = fashion_mnist.write_npz(a.output, n=a.n, split=a.split)
    except FileNotFoundError as e:
        raise EdgecError(str(e).splitlines()[0]) from None
    print(f"wrote {a.n or 'all'} {a.split} samples of {a.dataset} to {path}")
    return 0


def cmd_zoo(a) -> int:
    from edgec.models import zoo

    if a.name not in zoo.names():
        raise EdgecError(f"unknown zoo model '{a.name}' (known: {', '.join(zoo.names())})")
    try:
        path = zoo.export(a.name, a.output, seed=a.seed, batch=a.batch or None)
    except ImportError as e:
        raise EdgecError(str(e).splitlines()[0]) from None
    print(f"wrote {a.name} (seed {a.seed}, batch {a.batch or 'dynamic'}) to {path}")
    return 0


def cmd_passes(a) -> int:
    import dataclasses

    from edgec.passes import list_passes
    from edgec.driver.pipeline import PRESETS

    for info in list_passes():
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(info.config_cls))
        calib = " [needs --calib]" if info.needs_calib else ""
        print(f"{info.name:<20} {info.summary}{calib}")
        if fields:
            print(f"{'':<20}   options: {fields}")
    print("\npresets:")
    for name, passes in sorted(PRESETS.items()):
        print(f"  {name:<18} {', '.join(passes) or '(no passes)'}")
    return 0


def cmd_targets(a) -> int:
    from edgec.targets import list_targets

    for spec in list_targets():
        tc = f" (links with {spec.cross_compiler})" if spec.cross_compiler else ""
        print(f"{spec.name:<12} {spec.family:<5} {spec.description}{tc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgec", description="ONNX graph-rewriting compiler for "
                                "CNNs on edge devices (TVM backend)")
    p.add_argument("--version", action="version", version=f"edgec {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model into an artifact folder")
    c.add_argument("model")
    c.add_argument("--target", "-t", default="x86", help="target name (see 'edgec targets')")
    c.add_argument("-o", "--output", help="artifact folder (default: "
                   "<model folder>/<model stem>.edgec/<target>/)")
    c.add_argument("--passes", help="comma-separated passes (replaces the preset's list)")
    c.add_argument("--preset", help="named pass list (see 'edgec passes'; default: default)")
    c.add_argument("--set", action="append", metavar="PASS.KEY=VALUE",
                   help="pass option, typed from the pass's config (repeatable)")
    c.add_argument("--calib", metavar="FILE.npz", help="calibration data for data-aware passes")
    c.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="fix an input's shape (needed for dynamic dims; repeatable)")
    c.add_argument("--verify", action="store_true",
                   help="run onnxruntime after every pass; fail naming the pass that drifts")
    c.add_argument("--cuda-arch", help="CUDA compute capability, e.g. sm_87 (cuda targets)")
    c.add_argument("--mcpu", help="override the target CPU (LLVM -mcpu)")
    c.add_argument("--no-build", action="store_true",
                   help="run the passes and write model.onnx + report, but no TVM library")
    c.add_argument("--tune-trials", type=int, metavar="N",
                   help="tune with MetaSchedule (N trials in all) before building")
    c.add_argument("--tune-minutes", type=float, metavar="M", help="tuning time budget")
    c.add_argument("--no-tuning-db", action="store_true",
                   help="ignore the target's tuning database (default kernels only)")
    c.set_defaults(fn=cmd_compile)

    u = sub.add_parser("tune", help="tune a model's kernels (MetaSchedule) into the target's "
                       "tuning database, reused by every later compile")
    u.add_argument("model", nargs="?")
    u.add_argument("--target", "-t", default="x86")
    u.add_argument("--trials", type=int, default=64, help="trials in all (default 64)")
    u.add_argument("--minutes", type=float, help="time budget; Ctrl-C also stops and keeps")
    u.add_argument("--passes")
    u.add_argument("--preset")
    u.add_argument("--set", action="append", metavar="PASS.KEY=VALUE")
    u.add_argument("--calib", metavar="FILE.npz")
    u.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224")
    u.add_argument("--cuda-arch")
    u.add_argument("--mcpu")
    u.add_argument("--no-progress", action="store_true")
    u.add_argument("--export", dest="export_file", metavar="FILE.zip",
                   help="write the target's tuning database to FILE")
    u.add_argument("--import", dest="import_file", metavar="FILE.zip",
                   help="merge a tuning database exported elsewhere")
    u.set_defaults(fn=cmd_tune)

    r = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz")
    r.add_argument("artifact")
    r.add_argument("--data", required=True, metavar="INPUTS.npz")
    r.add_argument("-o", "--output", required=True, metavar="OUTPUTS.npz")
    r.add_argument("--threads", type=int)
    r.set_defaults(fn=cmd_run)

    k = sub.add_parser("check", help="accuracy regression against onnxruntime")
    k.add_argument("model")
    k.add_argument("artifact")
    k.add_argument("--data", required=True, metavar="VAL.npz",
                   help="one array per model input name, optional 'labels'")
    k.add_argument("--max-drop", type=float, help="max accuracy drop in points (needs labels)")
    k.add_argument("--min-cosine", type=float, default=0.99,
                   help="min cosine similarity of each output vs the original (default 0.99)")
    k.add_argument("--atol", type=float, help="also require allclose(atol, rtol)")
    k.add_argument("--rtol", type=float, default=0.0)
    k.add_argument("--min-top1", type=float, help="min top-1 agreement with the original")
    k.add_argument("--limit", type=int, help="use the first N samples")
    k.add_argument("--output", metavar="NAME",
                   help="the class-score output for top-1 and accuracy (default: the first)")
    k.add_argument("--threads", type=int)
    k.add_argument("--json", metavar="FILE", help="write the results as JSON")
    k.set_defaults(fn=cmd_check)

    b = sub.add_parser("bench", help="latency of onnxruntime vs the artifact, same run")
    b.add_argument("model")
    b.add_argument("artifact")
    b.add_argument("--threads", type=int)
    b.add_argument("--repeat", type=int, default=20)
    b.add_argument("--json", metavar="FILE")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("data", help="write a labeled .npz from a locally installed dataset")
    d.add_argument("dataset", help="fashion-mnist (Debian package dataset-fashion-mnist)")
    d.add_argument("output", metavar="OUT.npz")
    d.add_argument("--n", type=int, help="first N samples (default: all)")
    d.add_argument("--split", default="test", choices=["test", "train"])
    d.set_defaults(fn=cmd_data)

    z = sub.add_parser("zoo", help="export a model of the seeded zoo to ONNX")
    z.add_argument("name")
    z.add_argument("output", metavar="OUT.onnx")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--batch", type=int, default=1, help="0: dynamic batch axis")
    z.set_defaults(fn=cmd_zoo)

    sub.add_parser("passes", help="list passes and presets").set_defaults(fn=cmd_passes)
    sub.add_parser("targets", help="list targets").set_defaults(fn=cmd_targets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except EdgecError as e:
        if a.debug:
            raise
        print(f"edgec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if a.debug:
            raise
        print("edgec: error: out of memory (inputs, data or model too large for this machine)",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if a.debug:
            raise
        msg = str(e).strip().splitlines()
        print(f"edgec: internal error: {type(e).__name__}: {msg[-1] if msg else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
