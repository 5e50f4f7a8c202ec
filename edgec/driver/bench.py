"""``edgec bench``: onnxruntime vs the compiled artifact, measured in the same run.

Both runners get the same inputs (the compiled batch, seeded), the same thread count, a
warm-up, then ``repeat`` runs each, each runtime in its own fresh process, in alternating
rounds (so outside load hits both alike); medians are reported. The ratio is
``onnxruntime ms / edgec ms`` (> 1: edgec is faster). GFLOP/s counts 2 * MACs of the model
each runner executes (the original for onnxruntime, the rewritten one for edgec); the
machine's sgemm peak (numpy's BLAS or onnxruntime's MatMul, the faster; same threads) is
measured in the same run for scale.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError, one_line
from edgec.core.importer import load_model, normalize, random_feeds
from edgec.core.stats import model_stats
from edgec.runtime import OrtSession, Session
from edgec.runtime.artifact import REPORT, read_manifest


def sgemm_peak_gflops(threads: int, n: int = 2048, repeat: int = 3) -> float:
    """Best-of-``repeat`` float32 ``n x n`` GEMM throughput with ``threads`` threads, the
    faster of numpy's BLAS and onnxruntime's MLAS MatMul (numpy's OpenBLAS reaches about
    half of what MLAS does on a Zen 4 core, which onnxruntime's own convolutions exceed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ctx = threadpool_limits(threads) if threadpool_limits else _null()
    with ctx:
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeat))
    sess = OrtSession(_matmul_model(n), num_threads=threads, optimize=True)
    feeds = {"a": a, "b": b}
    sess.run(None, feeds)
    best = min(best, *(_timed(lambda: sess.run(None, feeds)) for _ in range(repeat)))
    return 2 * n ** 3 / best / 1e9


def _matmul_model(n: int):
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", io[:2],
                          io[2:])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(kind: str, path: str, feeds_path: str, threads: int, repeat: int,
            warmup: int) -> list[float]:
    """Time one runtime in this (fresh) process: seconds per run after ``warmup`` runs."""
    data = dict(np.load(feeds_path))
    if kind == "ort":
        sess = OrtSession(path, num_threads=threads, optimize=True)  # as deployed here
        run = lambda: _timed(lambda: sess.run(None, data))  # noqa: E731
    else:
        run = Session(path, num_threads=threads).timer(data)
    return _warm_times(run, repeat, warmup)


def _warm_times(run, repeat: int, warmup: int) -> list[float]:
    """``repeat`` results of the timing callable ``run`` after ``warmup`` discarded ones."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeat)]


def time_artifact(artifact: str | Path, feeds: dict[str, np.ndarray], threads: int,
                  repeat: int, warmup: int, board: dict | None = None) -> list[float]:
    """Seconds per run of a compiled artifact: here in a fresh process (the timing worker),
    or with ``board`` (``{"rpc", "key"}``) on a board over RPC (TVM's time evaluator)."""
    import tempfile

    if board is not None:
        from edgec.runtime.remote import RemoteSession

        run = RemoteSession(artifact, board["rpc"], board["key"]).timer(feeds)
        return _warm_times(run, repeat, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "feeds.npz"
        np.savez(fp, **feeds)
        return _run_worker("tvm", Path(artifact), fp, threads, repeat, warmup)


def _run_worker(kind: str, path: Path, feeds_path: Path, threads: int, repeat: int,
                warmup: int, cpu: str | None = None) -> list[float]:
    """Times from a fresh worker process; ``cpu``: the worker sees that x86 CPU family
    (:mod:`edgec.driver.cpumask`: extensions the family lacks hidden from CPUID)."""
    import subprocess
    import sys

    from .cpumask import worker_env

    res = subprocess.run([sys.executable, "-m", "edgec.driver.bench", kind, str(path),
                          str(feeds_path), str(threads), str(repeat), str(warmup)],
                         capture_output=True, text=True, env=worker_env(threads, cpu),
                         timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"bench worker ({kind}) failed: "
                           f"{one_line(res.stderr, None, last=True) or '?'}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(model_path: str | Path, artifact: str | Path, threads: int | None = None,
          repeat: int = 20, warmup: int = 3, peak: bool = True, rounds: int = 3,
          board: dict | None = None, profile: bool = False,
          peer_cpu: str | None = None) -> dict:
    """Median latency of onnxruntime and of the artifact on the same inputs.

    Each runtime is timed in its own fresh process (once TVM has run in a process,
    onnxruntime in that process was measured up to 2x slower here), in ``rounds`` alternating
    rounds so that load from elsewhere hits both alike. With ``board`` (``{"rpc", "key"}``)
    the artifact is timed on a board registered with TVM's RPC tracker (TVM's time evaluator
    there) and onnxruntime here, for reference only: no ratio across two machines.
    ``profile``: also each fused function's time beside onnxruntime's per-node profile
    (:mod:`edgec.driver.profile`). ``peer_cpu`` (an x86 family such as ``haswell``):
    onnxruntime runs as on that CPU (extensions it lacks hidden from CPUID, so its kernels
    are the ones such a machine runs) and is timed on the host's kernels too
    (``onnxruntime_host_ms``); the ratio is against the former."""
    import tempfile

    threads = threads or os.cpu_count() or 1
    manifest = read_manifest(artifact)
    shapes = {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}
    source = load_model(model_path)
    ref_model, _ = normalize(source, shapes)
    feeds = random_feeds(ref_model, seed=0)

    result = {"target": manifest["target"], "threads": threads, "repeat": repeat,
              "batch": next(iter(shapes.values()))[0] if shapes else None}
    macs_ref = model_stats(ref_model).macs
    report_path = Path(artifact) / REPORT
    macs_new = json.loads(report_path.read_text())["after"]["macs"] if report_path.is_file() \
        else macs_ref
    result["macs_original"] = macs_ref
    result["macs_compiled"] = macs_new
    runs_here = board is None and not (manifest["device"] == "cpu" and
                                       manifest.get("host_arch") != os.uname().machine)
    per_round = max(1, -(-repeat // rounds))
    ort_times, times, host_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        for _ in range(rounds):
            ort_times += _run_worker("ort", Path(model_path), feeds_path, threads, per_round,
                                     warmup, cpu=peer_cpu)
            if peer_cpu:
                host_times += _run_worker("ort", Path(model_path), feeds_path, threads,
                                          per_round, warmup)
            if runs_here:
                times += _run_worker("tvm", Path(artifact), feeds_path, threads, per_round,
                                     warmup)
    result["onnxruntime_ms"] = float(np.median(ort_times) * 1e3)
    result["onnxruntime_gflops"] = 2 * macs_ref / (result["onnxruntime_ms"] / 1e3) / 1e9
    if peer_cpu:
        result["onnxruntime_cpu"] = peer_cpu
        result["onnxruntime_host_ms"] = float(np.median(host_times) * 1e3)
    if board is not None:
        if profile:
            raise EdgecError("--profile runs the artifact here; it is not available over RPC")
        return _bench_on_board(result, artifact, feeds, board, repeat, warmup, macs_new)
    if not runs_here:
        result["edgec_ms"] = None
        result["note"] = f"artifact is for {manifest.get('host_arch')}: run bench on the device"
        return result
    result["edgec_ms"] = float(np.median(times) * 1e3)
    result["ratio"] = result["onnxruntime_ms"] / result["edgec_ms"]
    result["edgec_gflops"] = 2 * macs_new / (result["edgec_ms"] / 1e3) / 1e9
    if peak and manifest["device"] == "cpu":
        result["sgemm_peak_gflops"] = sgemm_peak_gflops(threads)
    if profile:
        from .profile import edgec_profile, ort_profile

        n = max(3, min(repeat, 10))
        result["profile"] = {"repeat": n,
                             "edgec": edgec_profile(artifact, feeds, threads, n),
                             "onnxruntime": ort_profile(model_path, feeds, threads, n,
                                                          cpu=peer_cpu)}
    return result


def _bench_on_board(result: dict, artifact, feeds, board: dict, repeat: int, warmup: int,
                    macs: int) -> dict:
    """Time the artifact on the board (TVM's time evaluator over RPC)."""
    from edgec.runtime.remote import RemoteSession

    sess = RemoteSession(artifact, board["rpc"], board["key"])
    times = _warm_times(sess.timer(feeds), repeat, warmup)
    result["edgec_on"] = sess.where
    result["onnxruntime_on"] = f"this host ({os.uname().machine}), for reference"
    result["edgec_ms"] = float(np.median(times) * 1e3)
    result["edgec_gflops"] = 2 * macs / (result["edgec_ms"] / 1e3) / 1e9
    result["ratio"] = None  # two machines: no speed-up to state
    result["emulated"] = bool(sess.board and "emulated" in sess.board)
    return result


def format_bench(r: dict) -> str:
    lines = [f"edgec bench: target {r['target']}, batch {r['batch']}, {r['threads']} threads, "
             f"median of {r['repeat']}"]
    lines.append(f"  onnxruntime  {r['onnxruntime_ms']:9.3f} ms"
                 + (f"  {r['onnxruntime_gflops']:7.1f} GFLOP/s" if "onnxruntime_gflops" in r
                    else "") + (f"  ({r['onnxruntime_on']})" if r.get("onnxruntime_on") else "")
                 + (f"  (as on a {r['onnxruntime_cpu']} CPU)" if r.get("onnxruntime_cpu")
                    else ""))
    if r.get("onnxruntime_host_ms"):
        lines.append(f"  onnxruntime  {r['onnxruntime_host_ms']:9.3f} ms  (this host's kernels,"
                     " for reference)")
    if r.get("edgec_on"):
        lines.append(f"  edgec        {r['edgec_ms']:9.3f} ms  {r['edgec_gflops']:7.1f} GFLOP/s"
                     f"  (on the {r['edgec_on']})")
        lines.append("  no ratio: the two ran on different machines"
                     + ("; an emulated board's time is emulation, not a board's speed"
                        if r.get("emulated") else ""))
        return "\n".join(lines)
    if r.get("edgec_ms") is None:
        lines.append(f"  edgec        n/a ({r.get('note')})")
        return "\n".join(lines)
    lines.append(f"  edgec        {r['edgec_ms']:9.3f} ms  {r['edgec_gflops']:7.1f} GFLOP/s")
    lines.append(f"  ratio onnxruntime/edgec = {r['ratio']:.3f}  (> 1: edgec faster)")
    if r.get("sgemm_peak_gflops"):
        pk = r["sgemm_peak_gflops"]
        lines.append(f"  sgemm peak {pk:.1f} GFLOP/s: onnxruntime "
                     f"{100 * r['onnxruntime_gflops'] / pk:.1f} %"
                     f", edgec {100 * r['edgec_gflops'] / pk:.1f} %")
    return "\n".join(lines)


# The timing worker: python -m edgec.driver.bench KIND PATH FEEDS THREADS N WARMUP
if __name__ == "__main__":
    import sys

    kind, path, feeds_path, threads_, n, warm = sys.argv[1:7]
    print(json.dumps(_worker(kind, path, feeds_path, int(threads_), int(n), int(warm))))
