"""``edgec tune [MODEL.onnx]``: MetaSchedule into the target's tuning database; its export and
import. Candidates run on this machine, or with ``--rpc HOST:PORT --key KEY`` on the boards
registered with that RPC tracker (cross-built here)."""

from __future__ import annotations

from edgec.core.errors import EdgecError

from ._args import (add_board_args, add_pipeline, add_target, add_target_options, board_of,
                    compile_options, target_options)


def add_parser(sub) -> None:
    u = sub.add_parser("tune", help="tune a model's kernels (MetaSchedule) into the target's "
                       "tuning database, reused by every later compile")
    u.add_argument("model", nargs="?")
    add_target(u)
    u.add_argument("--trials", type=int, default=64, help="trials in all (default 64)")
    u.add_argument("--minutes", type=float, help="time budget; Ctrl-C also stops and keeps")
    add_board_args(u)  # candidates measured on every board under the key, in parallel
    add_pipeline(u)
    add_target_options(u)
    u.add_argument("--no-progress", action="store_true")
    u.add_argument("--export", dest="export_file", metavar="FILE.zip",
                   help="write the target's tuning database to FILE")
    u.add_argument("--import", dest="import_file", metavar="FILE.zip",
                   help="merge a tuning database exported elsewhere")
    u.set_defaults(fn=run)


def run(a) -> int:
    from edgec.driver.compiler import prepare
    from edgec.targets import get_target, tuning

    spec = get_target(a.target)
    options = target_options(a)
    if a.export_file:
        path = tuning.export_db(spec, a.export_file, options)
        print(f"exported the {spec.name} tuning database to {path}")
        return 0
    if a.import_file:
        n = tuning.import_db(spec, a.import_file, options)
        print(f"imported {n} tuning records into {tuning.db_dir(spec, options)}")
        return 0
    board = board_of(a)
    if not a.model:
        raise EdgecError("edgec tune needs a MODEL (or --export/--import FILE)")
    prep = prepare(a.model, compile_options(a))
    from edgec.targets import backend

    backend.check_supported(prep.result.model)
    summary = tuning.tune(prep.result.model, spec, options, trials=a.trials,
                          minutes=a.minutes, progress=not a.no_progress, **(board or {}))
    print(f"tuned {summary['tasks']} tasks for {spec.name}; database {summary['db']}"
          + (f" ({summary['stopped']})" if summary.get("stopped") else ""))
    print(f"measured on {summary.get('where') or 'this machine'}")
    for name, c in summary["choices"].items():
        d = f"{c['default_s'] * 1e3:.3f} ms" if c.get("default_s") else "n/a"
        t = f"{c['tuned_s'] * 1e3:.3f} ms" if c.get("tuned_s") else "n/a"
        print(f"  {name:<48} default {d:>11}  tuned {t:>11}  -> {c['use']}")
    return 0
