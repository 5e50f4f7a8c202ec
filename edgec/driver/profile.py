"""``edgec bench --profile``: where the time goes, per fused function, beside onnxruntime's
per-node profile, so that a slow layer is found in one run.

edgec: the Relax VM's instrument hook (``VirtualMachine.set_instrument``) is called before and
after every call the VM makes; the time between the two is that call's (kernels run
synchronously on the calling thread, with their own thread pool; Python's garbage collector
is off meanwhile, or its pauses are counted as the calls'). Per function: the median
over ``repeat`` runs of the time of all its calls in a run (layers of one shape share a
function), its share of the sum over functions, GFLOP/s from the multiply-accumulates the
report records for one call times the calls, and its kernel.
The VM's own builtins (allocation, shape checks) are one line, ``vm builtins``.

onnxruntime: its profiler (``SessionOptions.enable_profiling``), per node the median ``dur``
over the runs, with the node's op type. Both run in fresh processes, as ``bench`` does.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgec.core.errors import one_line

from .cpumask import worker_env

BUILTINS = "vm builtins"


def _edgec_runs(path: str, feeds: dict, threads: int, repeat: int) -> list[dict[str, list]]:
    """Per run: function symbol -> [seconds, calls] (all its calls; builtins pooled)."""
    from edgec.runtime import Session

    sess = Session(path, num_threads=threads)
    tvm = sess._tvm
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), sess.device)
            for n in sess.input_names]
    current: dict[str, list] = {}
    started = [0.0]

    def instrument(func, symbol, before, ret, *rest):
        now = time.perf_counter()
        if before:
            started[0] = now
        else:
            key = BUILTINS if str(symbol).startswith("vm.builtin.") else str(symbol)
            slot = current.setdefault(key, [0.0, 0])
            slot[0] += now - started[0]
            slot[1] += 1
        return 0

    sess._call(args)  # warm up, uninstrumented
    sess._vm.set_instrument(instrument)
    runs = []
    # Python's garbage collector off while timing: the hook allocates at every call, so a
    # collection falls on the same calls run after run (the median does not filter it) and
    # was counted as theirs -- MobileNetV3's 1x1 projections at 56 x 56 showed 0.28-0.45 ms
    # each on two threads instead of 0.08-0.12
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            current = {}
            t0 = time.perf_counter()
            sess._call(args)
            current["(total run)"] = [time.perf_counter() - t0, 1]
            runs.append(current)
    finally:
        gc.enable()
    return runs


def _ort_runs(path: str, feeds: dict, threads: int, repeat: int) -> list[dict[str, list]]:
    """Per run: node name -> [seconds, op type], from onnxruntime's profiler."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        sess.run(None, {n: feeds[n] for n in names})  # warm up
        for _ in range(repeat):
            sess.run(None, {n: feeds[n] for n in names})
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs: list[dict[str, list]] = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append({})
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and runs:
            node = e["name"][:-len("_kernel_time")]
            slot = runs[-1].setdefault(node, [0.0, e.get("args", {}).get("op_name", "?")])
            slot[0] += e.get("dur", 0) / 1e6
    return runs[1:]  # the warm-up run


def _median_table(runs: list[dict], value=lambda v: v) -> dict[str, float]:
    keys = {k for r in runs for k in r}
    return {k: float(np.median([value(r[k]) if k in r else 0.0 for r in runs])) for k in keys}


def edgec_profile(artifact: str | Path, feeds: dict, threads: int, repeat: int) -> dict:
    """Per fused function (all its calls in a run): median seconds, share, calls, kernel,
    MACs and GFLOP/s."""
    runs = _run_worker("tvm", artifact, feeds, threads, repeat)
    calls = {k: int(v[1]) for r in runs for k, v in r.items()}
    med = _median_table(runs, value=lambda v: v[0])
    total_run = med.pop("(total run)", 0.0)
    kernels, macs = _kernels_of(Path(artifact))
    total = sum(med.values())
    rows = []
    for name, secs in sorted(med.items(), key=lambda kv: -kv[1]):
        m = macs.get(name, 0) * calls.get(name, 1)
        rows.append({"function": name, "ms": secs * 1e3, "calls": calls.get(name, 1),
                     "share": secs / total if total else 0.0,
                     "kernel": kernels.get(name, "-" if name == BUILTINS else "?"),
                     "macs": m, "gflops": 2 * m / secs / 1e9 if m and secs else None})
    return {"functions": rows, "total_ms": total * 1e3, "run_ms": total_run * 1e3}


def ort_profile(model: str | Path, feeds: dict, threads: int, repeat: int,
                cpu: str | None = None) -> dict:
    """Per onnxruntime node: median seconds, share and op type (``cpu``: as on that x86
    family, :mod:`edgec.driver.cpumask`)."""
    runs = _run_worker("ort", model, feeds, threads, repeat, cpu)
    ops = {k: v[1] for r in runs for k, v in r.items()}
    med = _median_table(runs, value=lambda v: v[0])
    total = sum(med.values())
    rows = [{"node": name, "op": ops[name], "ms": secs * 1e3,
             "share": secs / total if total else 0.0}
            for name, secs in sorted(med.items(), key=lambda kv: -kv[1])]
    return {"nodes": rows, "total_ms": total * 1e3}


def _kernels_of(artifact: Path) -> tuple[dict, dict]:
    try:
        k = json.loads((artifact / "report.json").read_text()).get("kernels") or {}
    except (OSError, ValueError):
        return {}, {}
    kernels = dict(k.get("functions", {}))
    kernels.update({n: "unscheduled" for n in k.get("unscheduled", {})})
    return kernels, dict(k.get("macs", {}))


def _run_worker(kind: str, path, feeds: dict, threads: int, repeat: int,
                cpu: str | None = None) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        res = subprocess.run([sys.executable, "-m", "edgec.driver.profile", kind, str(path),
                              str(feeds_path), str(threads), str(repeat)],
                             capture_output=True, text=True, env=worker_env(threads, cpu),
                             timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"profile worker ({kind}) failed: "
                           f"{one_line(res.stderr, None, last=True) or '?'}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def format_profile(prof: dict, top: int = 15) -> str:
    e, o = prof["edgec"], prof["onnxruntime"]
    lines = [f"edgec per fused function (median of {prof['repeat']} runs; functions sum to "
             f"{e['total_ms']:.3f} ms of a {e['run_ms']:.3f} ms run)",
             f"  {'function':<44} {'calls':>5} {'ms':>9} {'share':>7} {'GFLOP/s':>8}  kernel"]
    for r in e["functions"][:top]:
        gf = f"{r['gflops']:8.1f}" if r["gflops"] else f"{'-':>8}"
        lines.append(f"  {r['function'][:44]:<44} {r['calls']:>5} {r['ms']:9.3f} "
                     f"{100 * r['share']:6.1f}% {gf}  {r['kernel']}")
    if len(e["functions"]) > top:
        rest = e["functions"][top:]
        lines.append(f"  ({len(rest)} more: {sum(r['ms'] for r in rest):.3f} ms)")
    lines.append(f"onnxruntime per node (median of {prof['repeat']} runs; nodes sum to "
                 f"{o['total_ms']:.3f} ms)")
    lines.append(f"  {'node':<44} {'ms':>9} {'share':>7}  op")
    for r in o["nodes"][:top]:
        lines.append(f"  {r['node'][:44]:<44} {r['ms']:9.3f} {100 * r['share']:6.1f}%  {r['op']}")
    if len(o["nodes"]) > top:
        rest = o["nodes"][top:]
        lines.append(f"  ({len(rest)} more: {sum(r['ms'] for r in rest):.3f} ms)")
    return "\n".join(lines)


# The worker: python -m edgec.driver.profile KIND PATH FEEDS THREADS REPEAT
if __name__ == "__main__":
    kind, path, feeds_path, threads_, repeat_ = sys.argv[1:6]
    data = dict(np.load(feeds_path))
    fn = _edgec_runs if kind == "tvm" else _ort_runs
    print(json.dumps(fn(path, data, int(threads_), int(repeat_))))
