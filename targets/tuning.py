"""Tuning with MetaSchedule (``tvm.s_tir.meta_schedule``), on top of the default kernels:
the search (reading the database at build time is :mod:`.tuning_db`'s).

* Tasks are the fused TIR functions of the same front phases the compiler runs
  (:func:`edgec.targets.cpu.pipeline.cpu_front_phases`), so a tuned workload is found again
  at compile time; only functions with a convolution or matmul are tuned (the rest are memory-bound
  elementwise code the default schedule already handles).
* Every task's default-kernel latency is measured in the same run; a tuned schedule is used
  only where it measured faster (``choices.json``), so tuning never makes a model slower.
* One database per target in ``$EDGEC_CACHE/tuning/<target>-<hash>/`` (default
  ``~/.cache/edgec``), reused automatically by every later compile for that target, of any
  model with the same workloads. ``export_db`` / ``import_db`` ship it as a zip.
* Builds avoid importing ``tvm.s_tir.tensor_intrin`` (~30 s per builder process here).
* Ctrl-C (or the time budget) stops the search; what was measured so far is kept.

Tuning runs the candidates: here for a CPU target this machine can run, or, with ``rpc``
(``edgec tune --rpc HOST:PORT --key KEY``), on the boards registered under ``KEY`` with TVM's
RPC tracker (:mod:`edgec.runtime.remote`): candidates and default kernels are built here,
linked with the target's cross compiler, and timed on the boards (MetaSchedule's
``RPCRunner``, one worker per board, so several boards measure in parallel). The database
is the same target's folder either way, so the next ``edgec compile --target`` reuses it.
GPU targets are tuned neither way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import functools
import signal
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from edgec.core.errors import EdgecError

from .spec import TargetSpec
from .backend import make_target, to_relax
from .cpu.isa import select_isa, simd_floats
from .cpu.pipeline import cpu_front_phases
from .cpu.rules import schedule_func
from .phases import build_context, sequential
from .tuning_db import (CHOICES, database, db_dir, load_choices, save_choices, task_key,
                        task_module)

ANCHORS = ("edgec_conv2d_packed", "edgec_conv2d_stem", "edgec_dwconv2d", "edgec_dense_packed",
           "matmul", "conv2d", "T_matmul")


def _is_anchor(func) -> bool:
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root):
        if sch.get(b).name_hint.startswith(ANCHORS):
            return True
    return False


# ---------------------------------------------------------------------------------- tune
def _f_build(mod, target, _params):
    """MetaSchedule builder without the tensor_intrin import of the default one, under the
    model build's pass configuration: a candidate that would not build there fails here."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with build_context():
        return tvm_build(mod, target=target)


def _f_export(mod, cc: str | None = None) -> str:
    """MetaSchedule export for an RPC runner: a shared library linked with the target's
    (cross) compiler ``cc``, which the board's ``load_module`` opens (the default export is a
    tar the board would have to link itself). Module level, bound with functools.partial,
    so that the builder's popen workers can unpickle it."""
    path = os.path.join(tempfile.mkdtemp(prefix="edgec-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, **({"cc": cc} if cc else {}))
    return path


def _random_args(func, dev):
    args = []
    for buf in func.params:  # TVM 0.27: buffer parameters carry shape and dtype themselves
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        arr = np.random.default_rng(0).standard_normal(shape).astype(dtype) \
            if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(arr, dev))
    return args


def measure_default(func, target, repeat: int = 5, remote=None, cc: str | None = None,
                    name: str = "default") -> float:
    """Median seconds of one fused function under edgec's default schedule: here, or on the
    board of the RPC session ``remote`` (linked with ``cc``, uploaded as ``name``.so)."""
    scheduled, _ = schedule_func(func.with_attr("global_symbol", "main"), simd_floats(target),
                                 select_isa(target))
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=target)
    if remote is None:
        dev, mod = tvm.cpu(), lib.jit()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.so")
            lib.export_library(path, **({"cc": cc} if cc else {}))
            remote.upload(path)
        dev, mod = remote.cpu(), remote.load_module(f"{name}.so")
    args = _random_args(scheduled, dev)
    timer = mod.time_evaluator("main", dev, number=3, repeat=repeat, min_repeat_ms=10)
    return float(np.median(timer(*args).results))


def _task_loggers(logdir: Path, names: list[str]) -> list:
    """MetaSchedule's per-task loggers. Its logging config names every handler already on
    its global logger and fails on one without a name (pytest's log capture puts some
    there once a first tuning has run in the process): those are set aside meanwhile."""
    glob = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in glob.handlers if h.get_name() is None]
    for h in unnamed:
        glob.removeHandler(h)
    try:
        return ms.logging.get_loggers_from_work_dir(str(logdir), names)
    finally:
        for h in unnamed:
            glob.addHandler(h)


class _Deadline(Exception):
    pass


def tune(model, spec: TargetSpec, options: dict | None = None, trials: int = 64,
         minutes: float | None = None, progress: bool = True, seed: int = 0,
         rpc: str | None = None, key: str | None = None) -> dict:
    """Tune ``model`` (a normalized ONNX model) for ``spec``; returns a summary. With ``rpc``
    (a tracker's ``HOST:PORT``) and ``key``, candidates are measured on the boards there."""
    _check_tunable(spec, trials, rpc, key)
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-task logs go to the db folder
    target = make_target(spec, options)
    board = _board(spec, options, rpc, key) if rpc else None
    if board is not None:
        target = board["target"]
    path = db_dir(spec, options)
    names, funcs, weights = tasks_of(model, target)
    where = board["where"] if board else "this machine"
    if not funcs:
        return {"tasks": 0, "db": str(path), "choices": {}, "where": where}

    logdir = path / "logs"
    loggers = _task_loggers(logdir, names)
    tasks = []
    for (_key, func), name, lg, rs in zip(funcs, names, loggers,
                                          ms.utils.fork_seed(seed, n=len(funcs))):
        tasks.append(ms.TuneContext(
            mod=task_module(func), target=target, space_generator="post-order-apply",
            search_strategy="evolutionary", task_name=name, logger=lg, rand_state=rs,
            num_threads="physical"))

    deadline = time.monotonic() + 60 * minutes if minutes else None
    bar = _progress(trials, len(tasks), progress)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + \
        [_progress_callback(bar, names, deadline)]
    stopped = None
    prev = signal.getsignal(signal.SIGINT)
    try:
        _search(spec, path, tasks, weights, trials, callbacks, board)
    except KeyboardInterrupt:
        stopped = "interrupted: keeping what was measured"
    except Exception as e:  # noqa: BLE001 - our deadline crosses the FFI as another error
        if deadline is not None and time.monotonic() > deadline:
            stopped = f"time budget of {minutes} min reached"
        else:
            raise EdgecError(f"tuning failed: {str(e).strip().splitlines()[-1][:300]}") from None
    finally:
        signal.signal(signal.SIGINT, prev)
        if bar is not None:
            bar.close()
    choices = _choose(path, target, funcs, names, board)
    return {"tasks": len(funcs), "db": str(path), "stopped": stopped, "where": where,
            "boards": board["boards"] if board else 0,
            "choices": {choices[k]["task"]: choices[k] for k, _ in funcs}}


def _check_tunable(spec: TargetSpec, trials: int, rpc: str | None = None,
                   key: str | None = None) -> None:
    if spec.device != "cpu":
        raise EdgecError(f"tuning is for CPU targets (arm64, rpi4, rpi5, x86, ...): "
                         f"'{spec.name}' is a {spec.device} target"
                         + (", which RPC tuning does not measure" if rpc else ""))
    if rpc:
        from edgec.runtime.remote import parse_address

        parse_address(rpc)
        if not key:
            raise EdgecError("--rpc needs --key: the key the board registered under")
        spec.check_toolchain()  # candidates are linked here with the target's cross compiler
    elif not spec.runs_on_host():
        raise EdgecError(f"tuning measures candidates on the device: target '{spec.name}' "
                         "cannot run on this machine; measure them on a board with "
                         "--rpc HOST:PORT --key KEY (its RPC tracker and key)")
    if trials <= 0:
        raise EdgecError("--tune-trials must be positive")
    missing = [m for m in ("xgboost", "psutil", "cloudpickle")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgecError(f"tuning needs {', '.join(missing)}: pip install -e '.[tune]'")


def _board(spec: TargetSpec, options: dict | None, rpc: str, key: str) -> dict:
    """The boards under ``key`` at the tracker ``rpc``: how many, what one says it is, and the
    tuning target with its core count (MetaSchedule needs ``num-cores``). The session opened
    to ask is closed again before the search, which needs every board."""
    from edgec.runtime import remote as rr

    make_target(spec, options)  # validates the options
    sess = rr.connect(rpc, key, session_timeout=120)  # one-line errors: no tracker, no board
    try:
        described = rr.describe(sess)
        try:
            cores = int(sess.get_function("runtime.NumThreads")())
        except Exception:  # noqa: BLE001 - an old server: a Raspberry Pi's four cores
            cores = 4
    finally:
        del sess
    n = max(rr.boards(rpc, key), 1)
    d = dict(spec.tvm_target_dict(options))
    d.setdefault("num-cores", max(cores, 1))
    where = f"{n} '{key}' board{'s' if n > 1 else ''} via {rpc}" + \
        (f" [{described}]" if described else "")
    host, port = rr.parse_address(rpc)
    return {"address": rpc, "host": host, "port": port, "key": key, "boards": n,
            "where": where, "target": tvm.target.Target(d), "cc": spec.cross_compiler}


def tasks_of(model, target):
    """The tuning tasks of ``model`` (a normalized ONNX model), fused by the same front
    phases as the compile's: ``(names, [(key, func)], weights)`` (:func:`_collect_tasks`)."""
    return _collect_tasks(sequential(target, cpu_front_phases(target))(to_relax(model)))


def _collect_tasks(mod):
    """The distinct anchor functions: ``(names, [(key, func)], weights)``, a function that
    occurs several times weighted by its count."""
    weights, names, funcs = [], [], []
    seen: dict[str, int] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not _is_anchor(func):
            continue
        key = task_key(task_module(func))
        if key in seen:
            weights[seen[key]] += 1.0
            continue
        seen[key] = len(funcs)
        names.append(gv.name_hint)
        funcs.append((key, func))
        weights.append(1.0)
    return names, funcs, weights


def _progress_callback(bar, names: list[str], deadline: float | None):
    """A measure callback: the progress bar (best time per task), and the time budget."""
    best: dict[int, float] = {}

    @tvm.ir.utils.derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            for r in runner_results:
                if r.run_secs and not r.error_msg:
                    secs = float(np.mean([float(s) for s in r.run_secs]))
                    best[task_id] = min(best.get(task_id, secs), secs)
            if bar is not None:
                bar.update(len(runner_results))
                if task_id in best:
                    bar.set_postfix_str(f"task {task_id + 1}/{len(names)} {names[task_id]} "
                                        f"best {best[task_id] * 1e3:.3f} ms")
            if deadline is not None and time.monotonic() > deadline:
                raise _Deadline()

    return Progress()


def _search(spec: TargetSpec, path: Path, tasks, weights, trials: int, callbacks,
            board: dict | None = None) -> None:
    ms.tune_tasks(
        tasks=tasks, task_weights=weights, work_dir=str(path),
        max_trials_global=trials,
        # the target's defaults, shrunk for small budgets so every task gets a turn
        max_trials_per_task=max(spec.tuning.get("max_trials_per_task", 64),
                                trials // len(tasks)),
        num_trials_per_iter=min(spec.tuning.get("num_trials_per_iter", 16),
                                max(4, trials // len(tasks))),
        builder=ms.builder.LocalBuilder(
            f_build=_f_build, max_workers=os.cpu_count(), timeout_sec=120,
            f_export=functools.partial(_f_export, cc=board["cc"]) if board else None),
        runner=_runner(board),
        database=database(path), measure_callbacks=callbacks, cost_model="xgb",
        task_scheduler="gradient")


RPC_SESSION_TIMEOUT = 300  # s per candidate on a board (emulated boards are ~50x slower)


def _runner(board: dict | None):
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=10,
                                          enable_cpu_cache_flush=False)
    if board is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=60)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=board["host"], tracker_port=board["port"], tracker_key=board["key"],
            session_priority=1, session_timeout_sec=RPC_SESSION_TIMEOUT),
        evaluator_config=evaluator, max_workers=board["boards"])  # every board in parallel


def _choose(path: Path, target, funcs, names, board: dict | None = None) -> dict:
    """Keep the faster of default and tuned, per task (``choices.json``); with ``board``,
    the default kernels are timed on a board too."""
    choices = load_choices(path)
    db = database(path)  # re-read what was committed
    remote = None
    if board is not None:
        from edgec.runtime.remote import connect

        remote = connect(board["address"], board["key"], RPC_SESSION_TIMEOUT * len(funcs))
    for i, ((key, func), name) in enumerate(zip(funcs, names)):
        recs = db.query_tuning_record(task_module(func), target, workload_name="main")
        tuned = None
        if recs is not None and recs.run_secs:
            tuned = float(np.mean([float(s) for s in recs.run_secs]))
        try:
            default = measure_default(func, target, remote=remote,
                                      cc=board["cc"] if board else None,
                                      name=f"edgec_default_{i}")
        except Exception:  # noqa: BLE001 - no default schedule: tuned (if any) wins
            default = None
        use = "tuned" if tuned is not None and (default is None or tuned < default) else "default"
        choices[key] = {"task": name, "default_s": default, "tuned_s": tuned, "use": use}
        if board is not None:
            choices[key]["measured_on"] = board["where"]
    save_choices(path, choices)
    return choices


def _progress(total: int, ntasks: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"tuning {ntasks} tasks", unit="trial")


# ---------------------------------------------------------------------------------- ship
def export_db(spec: TargetSpec, file: str | Path, options: dict | None = None) -> Path:
    path = db_dir(spec, options)
    if not (path / CHOICES).is_file():
        raise EdgecError(f"no tuning database for target '{spec.name}' in {path}")
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("database_workload.json", "database_tuning_record.json", CHOICES):
            if (path / name).is_file():
                z.write(path / name, name)
        z.writestr("target.json", json.dumps({"target": spec.name,
                                              "tvm_target": spec.tvm_target_dict(options)}))
    os.replace(tmp, file)
    return file


def import_db(spec: TargetSpec, file: str | Path, options: dict | None = None) -> int:
    """Merge an exported database into this target's; returns the records imported."""
    file = Path(file)
    if not file.is_file():
        raise EdgecError(f"tuning database file not found: {file}")
    try:
        z = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise EdgecError(f"not an edgec tuning database (zip): {file}") from None
    with z, tempfile.TemporaryDirectory() as tmp:
        names = set(z.namelist())
        if not {"database_workload.json", "database_tuning_record.json", CHOICES} <= names:
            raise EdgecError(f"{file} lacks the database files")
        meta = json.loads(z.read("target.json")) if "target.json" in names else {}
        if meta.get("target") not in (None, spec.name):
            raise EdgecError(f"{file} was tuned for target '{meta.get('target')}', not "
                             f"'{spec.name}'")
        z.extractall(tmp)
        src = ms.database.JSONDatabase(work_dir=tmp)
        path = db_dir(spec, options)
        dst = database(path)
        n = 0
        for rec in src.get_all_tuning_records():
            wl = dst.commit_workload(rec.workload.mod)
            dst.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
            n += 1
        choices = load_choices(path)
        choices.update(json.loads(Path(tmp, CHOICES).read_text()))
        save_choices(path, choices)
    return n
