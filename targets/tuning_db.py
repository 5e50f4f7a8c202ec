"""Reading a tuning database: where a target's lives, and the pass that applies it.

One database per target in ``$EDGEC_CACHE/tuning/<target>-<hash>/`` (default
``~/.cache/edgec``): MetaSchedule's JSON database plus ``choices.json``, which says per task
(by structural hash) whether the tuned schedule measured faster than the default kernel.
Writing it is :mod:`.tuning`'s (the search).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from .spec import TargetSpec
from .phases import build_context
from .records import BuildRecord

CHOICES = "choices.json"



def cache_root() -> Path:
    return Path(os.environ.get("EDGEC_CACHE") or Path.home() / ".cache" / "edgec")


def db_dir(spec: TargetSpec, options: dict | None = None) -> Path:
    """The tuning database folder of a target (its name and the resolved TVM target)."""
    target_json = json.dumps(spec.tvm_target_dict(options), sort_keys=True)
    digest = hashlib.sha256(target_json.encode()).hexdigest()[:12]
    return cache_root() / "tuning" / f"{spec.name}-{digest}"



def find_db(spec: TargetSpec, options: dict | None = None) -> str | None:
    """The target's tuning database folder if one was written (it has ``choices.json``)."""
    path = db_dir(spec, options)
    return str(path) if (path / CHOICES).is_file() else None


def database(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path))


def load_choices(path: Path) -> dict:
    f = path / CHOICES
    return json.loads(f.read_text()) if f.is_file() else {}


def save_choices(path: Path, choices: dict) -> None:
    tmp = path / f".{CHOICES}.tmp"
    tmp.write_text(json.dumps(choices, indent=1, sort_keys=True))
    os.replace(tmp, path / CHOICES)


def task_module(func) -> "tvm.IRModule":
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def task_key(mod) -> str:
    return str(tvm_ffi.structural_hash(mod))


def build_error(func, target) -> str | None:
    """Why the scheduled PrimFunc ``func`` does not build alone for ``target`` under the
    pipeline's pass configuration (None: it builds)."""
    try:
        with build_context():
            tvm.tirx.build(task_module(func), target=target)
    except Exception as e:  # noqa: BLE001 - TVM's errors cross the FFI as several types
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
    return None


def apply_tuned_pass(target, tuning_db: str, record: BuildRecord | None = None):
    """Module pass: replace each fused function by its tuned schedule where the database has
    one that measured faster than the default kernel. With ``record.verify_tuned``, a tuned
    schedule is first built alone and, where that fails, the function keeps its default
    kernel (``record.tuned_rejected``)."""
    path = Path(tuning_db)

    @tvm.transform.module_pass(opt_level=0, name="EdgecApplyTuned")
    def _pass(mod, _ctx):
        choices = load_choices(path)
        if not choices:
            return mod
        db = database(path)
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            tmod = task_module(func)
            choice = choices.get(task_key(tmod))
            if not choice or choice.get("use") != "tuned":
                continue
            sch = db.query_schedule(tmod, target, workload_name="main")
            if sch is None:
                continue
            new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if record is not None and record.verify_tuned:
                err = build_error(new, target)
                if err is not None:
                    record.tuned_rejected[gv.name_hint] = err
                    continue
            if func.attrs is not None and "global_symbol" not in func.attrs:
                new = new.without_attr("global_symbol")
            updates[gv] = new
            if record is not None:
                record.kernels[gv.name_hint] = "tuned"
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass

