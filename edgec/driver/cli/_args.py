"""What more than one subcommand shares: argument groups, their readers, number formats."""

from __future__ import annotations

import argparse


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# -- the target: --target and the options targets declare -------------------------------------

def add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", "-t", default="x86", help="target name (see 'edgec targets')")


def _declared_options() -> list:
    """Every target option some target declares (:attr:`TargetSpec.options`), by flag."""
    from edgec.targets import all_options

    return sorted(all_options(), key=lambda o: o.flag)


def add_target_options(p: argparse.ArgumentParser) -> None:
    """One flag per declared target option (``--cuda-arch``, ``--mcpu`` ...)."""
    for o in _declared_options():
        p.add_argument(o.flag, dest=o.name, help=o.help)


def target_options(a: argparse.Namespace) -> dict:
    """The target options given on the command line, as ``target_options`` for the target."""
    return {o.name: v for o in _declared_options() if (v := getattr(a, o.name, None))}


# -- the pass pipeline: which passes, their options, calibration, input shapes -----------------

def add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passes", help="comma-separated passes (replaces the preset's list)")
    p.add_argument("--preset", help="named pass list (see 'edgec passes'; default: default)")
    p.add_argument("--set", action="append", metavar="PASS.KEY=VALUE",
                   help="pass option, typed from the pass's config (repeatable)")
    p.add_argument("--calib", metavar="FILE.npz", help="calibration data for data-aware passes")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="fix an input's shape (needed for dynamic dims; repeatable)")


def compile_options(a: argparse.Namespace, **more):
    """:class:`~edgec.driver.compiler.CompileOptions` from the target and pipeline groups."""
    from edgec.core.importer import parse_input_shapes
    from edgec.driver.compiler import CompileOptions
    from edgec.runtime import load_npz

    return CompileOptions(
        target=a.target,
        passes=csv(a.passes) if a.passes is not None else None,
        preset=a.preset,
        sets=a.set or [],
        input_shapes=parse_input_shapes(a.input_shape),
        calib=load_npz(a.calib) if a.calib else None,
        target_options=target_options(a),
        **more,
    )


def write_json(path: str | None, res: dict) -> None:
    """``--json FILE``: the results, indented."""
    import json
    from pathlib import Path

    if path:
        Path(path).write_text(json.dumps(res, indent=2) + "\n")


# -- what run, check and bench share ------------------------------------------------------------

def add_model_and_artifact(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("artifact")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int)


def add_board_args(p: argparse.ArgumentParser) -> None:
    """``--rpc HOST:PORT --key KEY``: run on a board registered with TVM's RPC tracker."""
    p.add_argument("--rpc", metavar="HOST:PORT",
                   help="TVM RPC tracker: run (or, for tune, measure) on a board registered "
                   "there")
    p.add_argument("--key", help="the board's key at the tracker (e.g. rpi4)")


def board_of(a: argparse.Namespace) -> dict | None:
    """The board to run on (``{"rpc", "key"}``), or ``None`` for this machine."""
    from edgec.core.errors import EdgecError
    from edgec.runtime.remote import parse_address

    if a.rpc:
        parse_address(a.rpc)
    if a.key and not a.rpc:
        raise EdgecError("--key names a board at a tracker: give the tracker with --rpc "
                         "HOST:PORT")
    if a.rpc and not a.key:
        raise EdgecError("--rpc needs --key: the key the board registered under")
    return {"rpc": a.rpc, "key": a.key} if a.rpc else None
