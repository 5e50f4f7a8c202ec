"""``edgec run ARTIFACT --data INPUTS.npz -o OUTPUTS.npz``: an artifact on inputs from a file."""

from __future__ import annotations

import os
from pathlib import Path

from edgec.core.errors import EdgecError

from ._args import add_board_args, add_threads, board_of


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz")
    r.add_argument("artifact")
    r.add_argument("--data", required=True, metavar="INPUTS.npz")
    r.add_argument("-o", "--output", required=True, metavar="OUTPUTS.npz")
    add_threads(r)
    add_board_args(r)
    r.set_defaults(fn=run)


def run(a) -> int:
    import numpy as np

    from edgec.runtime import load_npz, open_session, run_batched

    out = Path(a.output)
    if not a.output.strip() or out.is_dir():
        raise EdgecError(f"-o must name an .npz file, not a folder: '{a.output}'")
    sess = open_session(a.artifact, num_threads=a.threads, **(board_of(a) or {}))
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
