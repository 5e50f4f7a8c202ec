"""Conformance of ``edgec compile --target x86`` against the ONNX package's backend test data.

The ``onnx`` wheel ships node-level test cases under ``onnx/backend/test/data/<suite>/<case>/``:
a ``model.onnx`` and ``test_data_set_N/{input,output}_K.pb`` (TensorProto files; inputs map to
the model's non-initializer graph inputs in order, outputs to the graph outputs in order).
For every case this script compiles the model for ``x86`` (dynamic input dims fixed to the
stored inputs' shapes), runs the artifact with :class:`edgec.runtime.Session` on every stored
data set and compares with the stored outputs. Each case gets one status:

* ``passed``  -- compiled, ran, every output matches;
* ``refused`` -- ``compile_model`` raised :class:`edgec.core.errors.EdgecError` (the clean, named
  refusal of an unsupported model; its one-line message is the detail);
* ``wrong``   -- compiled and ran, but an output differs (shape, dtype or values);
* ``crashed`` -- any other exception (compile or run), an EdgecError raised *after* a
  successful compile, or a worker process that died (segfault).

Tolerance: floating outputs ``np.allclose(got, want, rtol=1e-3, atol=1e-4, equal_nan=True)``;
integer and bool outputs must be exactly equal; shapes must match exactly and the dtype kind
(float / signed / unsigned / bool) and width must match.

Usage::

    python benchmarks/conformance.py [--suite pytorch-converted,simple] [--json FILE]
                                     [--jobs N] [--case SUBSTRING]

Cases run in worker processes (``--jobs``, default 1), each on a fresh temporary artifact
folder that is deleted afterwards; a worker that dies is reported as ``crashed`` and replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

SUITES = ("pytorch-converted", "simple")
RTOL = 1e-3
ATOL = 1e-4
TOLERANCE = (f"float outputs: np.allclose(rtol={RTOL:g}, atol={ATOL:g}, equal_nan=True); "
             "integer/bool outputs: exact; shapes and dtypes must match")
STATUSES = ("passed", "refused", "wrong", "crashed")


# ------------------------------------------------------------------------------------ cases
def data_root() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def list_cases(suites=SUITES) -> list[Path]:
    """Case folders (``.../<suite>/<case>``) of the given suites, sorted."""
    root = data_root()
    out = []
    for s in suites:
        d = root / s
        if not d.is_dir():
            raise FileNotFoundError(f"no ONNX backend test suite '{s}' under {root}")
        out.extend(sorted(p for p in d.iterdir() if (p / "model.onnx").is_file()))
    return out


def case_id(case: Path) -> str:
    return f"{case.parent.name}/{case.name}"


def _read_value(path: Path, type_proto):
    """Read one stored ``.pb`` as the kind of value the model's type says (tensor by default;
    sequence/optional cases are read as such, so their refusal is the compiler's, not ours)."""
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    kind = type_proto.WhichOneof("value") if type_proto is not None else "tensor_type"
    if kind == "sequence_type":
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if kind == "optional_type":
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    if kind == "map_type":
        p = onnx.MapProto()
        p.ParseFromString(data)
        return numpy_helper.to_dict(p)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return numpy_helper.to_array(t)


def load_case(case: Path):
    """-> (model, input value-infos, data sets [(set name, [inputs], [outputs])])."""
    import onnx

    model = onnx.load(str(case / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    outputs = list(model.graph.output)
    sets = []
    for ds in sorted(case.glob("test_data_set_*")):
        ins = [_read_value(ds / f"input_{k}.pb", inputs[k].type if k < len(inputs) else None)
               for k in range(len(list(ds.glob("input_*.pb"))))]
        outs = [_read_value(ds / f"output_{k}.pb", outputs[k].type if k < len(outputs) else None)
                for k in range(len(list(ds.glob("output_*.pb"))))]
        sets.append((ds.name, ins, outs))
    return model, inputs, sets


def dynamic_input_shapes(inputs, arrays) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` for compile_model: the stored shape of every tensor input whose model
    shape has a missing / symbolic / non-positive dim."""
    shapes = {}
    for vi, a in zip(inputs, arrays):
        if vi.type.WhichOneof("value") != "tensor_type" or not isinstance(a, np.ndarray):
            continue
        tt = vi.type.tensor_type
        dims = tt.shape.dim
        dynamic = (not tt.HasField("shape") or len(dims) != a.ndim or
                   any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims))
        if dynamic:
            shapes[vi.name] = tuple(int(s) for s in a.shape)
    return shapes


# ------------------------------------------------------------------------------- comparison
def compare(got, want) -> str | None:
    """None when ``got`` matches ``want`` under the stated tolerance, else why not."""
    if not isinstance(want, np.ndarray):
        return f"expected a {type(want).__name__}, not a tensor"
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != expected {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != expected {want.dtype}"
    if want.dtype.kind in "fc":
        if np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
            return None
        with np.errstate(invalid="ignore"):
            err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bad = ~np.isclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)
        return (f"{int(bad.sum())}/{want.size} elements off, max abs err "
                f"{float(np.nanmax(err)) if err.size else 0:.3g}")
    if np.array_equal(got, want):
        return None
    bad = got != want
    return f"{int(bad.sum())}/{want.size} elements differ (exact match required for {want.dtype})"


# ------------------------------------------------------------------------------------- run
def run_case(case: str | os.PathLike, workdir: str | os.PathLike | None = None) -> dict:
    """Compile and run one case; returns ``{"case", "suite", "status", "detail", "seconds"}``.

    Never raises (except KeyboardInterrupt): every failure is classified.
    """
    from edgec.driver.compiler import CompileOptions, compile_model
    from edgec.core.errors import EdgecError

    case = Path(case)
    res = {"case": case.name, "suite": case.parent.name, "status": None, "detail": "",
           "seconds": 0.0}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="edgec-conf-", dir=workdir))
    stage = "load test data"
    try:
        model, inputs, sets = load_case(case)
        if not sets:
            raise RuntimeError("case has no test_data_set_*")
        # One compile per distinct set of input shapes (every shipped case has one data set).
        groups: dict[tuple, list] = {}
        for name, ins, outs in sets:
            shapes = dynamic_input_shapes(inputs, ins)
            groups.setdefault(tuple(sorted(shapes.items())), []).append((name, ins, outs))
        for gi, (key, group) in enumerate(groups.items()):
            out = tmp / f"art{gi}"
            stage = "compile"
            try:
                compile_model(case / "model.onnx", out,
                              CompileOptions(target="x86", input_shapes=dict(key)))
            except EdgecError as e:
                res["status"] = "refused"
                res["detail"] = _one_line(f"{type(e).__name__}: {e}")
                return res
            stage = "run"
            from edgec.runtime import Session

            sess = Session(out)
            for name, ins, outs in group:
                if len(ins) != len(sess.input_names):
                    raise RuntimeError(f"{name}: {len(ins)} stored inputs, artifact takes "
                                       f"{len(sess.input_names)}")
                got = sess.run(None, dict(zip(sess.input_names, ins)))
                if len(got) != len(outs):
                    res["status"] = "wrong"
                    res["detail"] = f"{name}: {len(got)} outputs, expected {len(outs)}"
                    return res
                for k, (g, w) in enumerate(zip(got, outs)):
                    why = compare(g, w)
                    if why:
                        res["status"] = "wrong"
                        res["detail"] = _one_line(
                            f"{name} output {k} ('{sess.output_names[k]}'): {why}")
                        return res
        res["status"] = "passed"
        nsets = sum(len(g) for g in groups.values())
        res["detail"] = f"{nsets} data set(s) match"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - anything else is a crash
        res["status"] = "crashed"
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        loc = f" [{Path(where.filename).name}:{where.lineno}]" if where else ""
        res["detail"] = _one_line(f"during {stage}: {type(e).__name__}: {e}{loc}")
    finally:
        res["seconds"] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _worker(case: str) -> dict:
    return run_case(case)


def _init_worker(threads: int | None) -> None:
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)


def run_cases(cases, jobs: int = 1, progress=None) -> list[dict]:
    """Run cases in ``jobs`` worker processes (a segfault in TVM kills only its worker: the
    case is reported ``crashed`` and the pool is rebuilt). Results come back in case order."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing as mp

    cases = [str(c) for c in cases]
    # Spawned workers unpickle ``_worker`` by module name: make this file importable as such
    # when it was loaded by path (importlib) rather than run as a script.
    here = str(Path(__file__).resolve().parent)
    if __name__ != "__main__" and here not in sys.path:
        sys.path.append(here)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if jobs > 1 else None
    results: dict[str, dict] = {}
    pending = list(cases)
    ctx = mp.get_context("spawn")  # TVM's thread pool does not survive fork
    while pending:
        broken = False
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx,
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futs = {c: pool.submit(_worker, c) for c in pending}
            for c in pending:
                try:
                    r = futs[c].result()
                except BrokenProcessPool:
                    broken = True
                    continue
                results[c] = r
                if progress:
                    progress(r)
        done = [c for c in pending if c in results]
        pending = [c for c in pending if c not in results]
        if broken and pending:
            # Rerun the unfinished ones one at a time: the first to kill its worker is the culprit.
            if not done:
                culprit = pending.pop(0)
                r = _isolated(culprit)
                results[culprit] = r
                if progress:
                    progress(r)
    return [results[c] for c in cases]


def _isolated(case: str) -> dict:
    """Run one case in its own process; a dead process becomes a ``crashed`` result."""
    import subprocess

    code = ("import json,sys; sys.path.insert(0, sys.argv[1]); import conformance as c; "
            "print('@@'+json.dumps(c.run_case(sys.argv[2])))")
    p = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), case],
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    case_p = Path(case)
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return {"case": case_p.name, "suite": case_p.parent.name, "status": "crashed",
            "detail": _one_line(f"process died (exit {p.returncode}): {tail}"), "seconds": 0.0}


# ---------------------------------------------------------------------------------- report
def summarize(results: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        c = counts.setdefault(r["suite"], {s: 0 for s in STATUSES})
        c[r["status"]] += 1
    total = {s: sum(c[s] for c in counts.values()) for s in STATUSES}
    counts["total"] = total
    return counts


def format_table(results: list[dict]) -> str:
    w = max([len(case_id_of(r)) for r in results] + [4])
    lines = [f"{'case':<{w}}  {'status':<8} {'sec':>6}  detail", "-" * (w + 80)]
    for r in results:
        lines.append(f"{case_id_of(r):<{w}}  {r['status']:<8} {r['seconds']:>6.1f}  {r['detail']}")
    return "\n".join(lines)


def case_id_of(r: dict) -> str:
    return f"{r['suite']}/{r['case']}"


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    lines = [f"{'suite':<18} " + " ".join(f"{s:>8}" for s in STATUSES) + f" {'cases':>6}"]
    for suite, c in counts.items():
        lines.append(f"{suite:<18} " + " ".join(f"{c[s]:>8}" for s in STATUSES) +
                     f" {sum(c.values()):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=",".join(SUITES),
                    help="comma-separated suites (default: %(default)s)")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--case", action="append", default=[],
                    help="only cases whose name contains this (repeatable)")
    args = ap.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    cases = list_cases(suites)
    if args.case:
        cases = [c for c in cases if any(s in c.name for s in args.case)]
    print(f"{len(cases)} cases from {', '.join(suites)} ({data_root()}); target x86; "
          f"tolerance: {TOLERANCE}", flush=True)
    t0 = time.perf_counter()
    results = run_cases(cases, jobs=args.jobs,
                        progress=lambda r: print(f"  {r['status']:<8} {case_id_of(r)} "
                                                 f"({r['seconds']:.1f}s)", flush=True))
    wall = time.perf_counter() - t0
    counts = summarize(results)
    print()
    print(format_table(results))
    print()
    print(format_counts(counts))
    print(f"\ntolerance: {TOLERANCE}\nwall time: {wall:.1f}s with {args.jobs} job(s)")
    if args.json:
        import onnx

        Path(args.json).write_text(json.dumps({
            "target": "x86", "suites": suites, "onnx": onnx.__version__,
            "tolerance": {"rtol": RTOL, "atol": ATOL, "rule": TOLERANCE},
            "wall_s": round(wall, 1), "counts": counts, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if counts["total"]["wrong"] or counts["total"]["crashed"] else 0


if __name__ == "__main__":
    from _results import main_recorded

    sys.exit(main_recorded("conformance", "ONNX backend conformance", main))
