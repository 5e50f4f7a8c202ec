"""The ``edgec`` command line: one module per subcommand, each with ``add_parser(sub)`` and
``run(args) -> exit code``; :mod:`._args` holds the argument groups they share (the target and
the options targets declare, the pass pipeline, threads, ``--json``).

    edgec compile MODEL.onnx [--target x86] [-o OUT] [--passes a,b | --preset NAME]
                  [--set pass.key=value ...] [--calib FILE.npz] [--input-shape NAME=1x3x224x224]
                  [--verify] [--cuda-arch sm_87]
    edgec tune [MODEL.onnx] [--trials N] [--export FILE.zip | --import FILE.zip]
    edgec run OUT --data inputs.npz -o outputs.npz
    edgec check MODEL.onnx OUT --data val.npz [--max-drop 1.0] [--json FILE]
    edgec bench MODEL.onnx OUT [--threads N]
    (run, check, bench: --rpc HOST:PORT --key KEY runs the artifact on a board via TVM's tracker)
    edgec board --emulate --tracker HOST:PORT --key KEY | --install | --list --tracker HOST:PORT
    edgec data fashion-mnist OUT.npz | edgec zoo NAME OUT.onnx
    edgec passes | edgec targets

User errors print one line on stderr and exit 2; a failed check exits 1; an internal error
prints one line and exits 3 (``--debug`` shows the traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys

from edgec import __version__
from edgec.core.errors import EdgecError, one_line

from . import bench, board, check, compile, data, passes, run, targets, tune, zoo

# In the order ``edgec --help`` lists them.
COMMANDS = (compile, tune, run, check, bench, board, data, zoo, passes, targets)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgec", description="ONNX graph-rewriting compiler for "
                                "CNNs on edge devices (TVM backend)")
    p.add_argument("--version", action="version", version=f"edgec {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
        print(f"edgec: internal error: {type(e).__name__}: {one_line(e, None, last=True)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 3

