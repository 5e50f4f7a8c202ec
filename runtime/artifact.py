"""The compiled artifact: a folder holding

* ``model.so``      -- the TVM library (Relax VM executable, weights bound as constants);
* ``model.onnx``    -- the rewritten graph, runnable in onnxruntime;
* ``manifest.json`` -- inputs/outputs (names, shapes, dtypes), target, versions, source sha256;
* ``report.json``   -- the compile report (passes, statistics, timings).

It is written into a temporary sibling folder and renamed into place at the end, so a failed
compile leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgec.errors import EdgecError

MANIFEST = "manifest.json"
LIBRARY = "model.so"
ONNX = "model.onnx"
REPORT = "report.json"
FORMAT = "edgec-artifact/1"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def check_output_dir(out: Path, force: bool = True) -> None:
    """Refuse an output path that is a file or a non-empty folder other than an artifact."""
    if out.exists():
        if not out.is_dir():
            raise EdgecError(f"output path exists and is not a folder: {out}")
        if any(out.iterdir()) and not is_artifact(out):
            raise EdgecError(f"output folder {out} exists and is not an edgec artifact: "
                             "refusing to overwrite it")
        if not force:
            raise EdgecError(f"output folder {out} exists")


@contextlib.contextmanager
def staging(out: Path, force: bool = True):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` atomically.

    An existing ``out`` is replaced only if it is empty or an earlier edgec artifact.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_manifest(out: str | os.PathLike) -> dict:
    out = Path(out)
    if not out.is_dir():
        raise EdgecError(f"artifact folder not found: {out}")
    path = out / MANIFEST
    if not path.is_file():
        raise EdgecError(f"not an edgec artifact (no {MANIFEST}): {out}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgecError(f"corrupt {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise EdgecError(f"{path}: unknown artifact format {manifest.get('format')!r}")
    return manifest
