"""The TVM side of compilation: ONNX -> Relax, the target's pipeline, build, export.

Only this package and :mod:`edgec.runtime` import TVM.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import onnx
import tvm
from tvm import relax

from edgec.core.errors import EdgecError, UnsupportedOpError

from .spec import TargetSpec
from .cpu.isa import select_isa
from .phases import build_context, sequential
from .records import BuildRecord, BuildResult, BuildTimings
from .tuning_db import find_db


# ---------------------------------------------------------------------------------- frontend
def supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map()) | {"Constant", "If"}


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse, by op and node name, anything the TVM ONNX frontend cannot import."""
    ops = supported_ops()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            raise UnsupportedOpError(node.op_type, node.name)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        # TVM's converter inserts at len+p+1 for a negative p (ONNX: len+p).
        if node.op_type == "SequenceInsert" and len(node.input) > 2 and node.input[2]:
            pos = inits.get(node.input[2])
            if pos is None or int(onnx.numpy_helper.to_array(pos)) < 0:
                raise EdgecError(f"SequenceInsert at node '{node.name}' with a negative or "
                                 "non-constant position is not supported")
    for vi in model.graph.input:
        et = vi.type.tensor_type.elem_type
        if et in (onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64,
                  onnx.TensorProto.COMPLEX128):
            raise EdgecError(f"input '{vi.name}' has an unsupported element type "
                             f"{onnx.TensorProto.DataType.Name(et)}")


def to_relax(model: onnx.ModelProto) -> "tvm.IRModule":
    """Import a normalized (static-shaped) model; weights become bound constants so the
    pipeline can fold and re-lay them out at compile time."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(model)
    inits = {t.name for t in model.graph.initializer}
    shape_dict, dtype_dict = {}, {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape_dict[vi.name] = [d.dim_value for d in tt.shape.dim]
        dtype_dict[vi.name] = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    err = None
    with NativeOutput() as out:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict,
                                keep_params_in_input=False)
        except tvm.error.OpNotImplemented as e:
            err = f"TVM ONNX frontend: {str(e).strip().splitlines()[-1]}"
        except Exception as e:  # noqa: BLE001 - the frontend raises many types
            msg = str(e).strip().splitlines()
            err = ("TVM ONNX frontend could not import the model: "
                   f"{type(e).__name__}: {msg[-1] if msg else ''}"[:400])
    out.raise_for(err)
    _check_static_outputs(model, mod)
    return mod


def _leaves(sinfo) -> list:
    return [x for f in sinfo.fields for x in _leaves(f)] if hasattr(sinfo, "fields") else [sinfo]


def _check_static_outputs(model: onnx.ModelProto, mod) -> None:
    """Every output must have the static shape the ONNX graph declares; TVM's import of a
    data-dependent op (e.g. Expand by a runtime shape) can silently differ from ONNX."""
    leaves = _leaves(mod["main"].ret_ty)
    outputs = list(model.graph.output)
    if len(leaves) != len(outputs):
        raise EdgecError(f"TVM import returned {len(leaves)} outputs, the model has "
                         f"{len(outputs)}")
    for o, sinfo in zip(outputs, leaves):
        want = [d.dim_value for d in o.type.tensor_type.shape.dim]
        shape = getattr(sinfo, "shape", None)
        values = list(getattr(shape, "values", None) or []) if shape is not None else None
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values) or \
                [int(v) for v in values] != want:
            raise EdgecError(f"output '{o.name}' has a data-dependent shape after import "
                             f"({sinfo}), the ONNX model declares {want}: not supported")


class NativeOutput:
    """Around TVM calls that fail noisily: what TVM's C++ and Python print (file descriptors 1
    and 2: "Error converting operator ...", "BlockBuilder destroyed with remaining blocks")
    goes to a temporary file, passed on to stderr only when the call succeeds; on an error
    the one-line EdgecError says what failed. Ctrl-C is remembered, so that an interrupt
    TVM turns into some other exception still ends as KeyboardInterrupt (exit 130).

    Catch the call's exception inside the block (so that its frames, which hold TVM objects
    whose destructors print, are released while the output is still captured), then call
    :meth:`raise_for` with the message after it."""

    def __enter__(self):
        self.interrupted = False
        self._handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                self.interrupted = True
                raise KeyboardInterrupt

            self._handler = signal.signal(signal.SIGINT, on_sigint)
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.interrupted = True
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()
        if self.interrupted:
            raise KeyboardInterrupt from None
        return False

    def raise_for(self, err: str | None) -> None:
        if err is not None:
            raise EdgecError(err)
        if self.text.strip():
            sys.stderr.write(self.text)
            sys.stderr.flush()


# ---------------------------------------------------------------------------------- build
def make_target(spec: TargetSpec, options: dict | None = None) -> "tvm.target.Target":
    try:
        d = spec.tvm_target_dict(options)
    except EdgecError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EdgecError(f"bad target options for '{spec.name}': {e}") from None
    check_mcpu(spec, d, (options or {}).get("mcpu"))
    try:
        return tvm.target.Target(d)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise EdgecError(f"bad target options for '{spec.name}': "
                         f"{msg[-1] if msg else type(e).__name__}"[:300]) from None


def check_mcpu(spec: TargetSpec, target: dict, given: str | None) -> None:
    """LLVM builds for a generic CPU after printing errors when it does not know -mcpu:
    refuse an unknown one instead."""
    mcpu, triple = target.get("mcpu"), target.get("mtriple")
    if not given or not mcpu or target.get("kind") != "llvm":
        return
    valid = tvm.get_global_func("target.llvm_is_valid_cpu", allow_missing=True)
    if valid is None or not triple or valid(mcpu, triple):
        return
    known = tvm.get_global_func("target.llvm_get_cpu_archlist", allow_missing=True)
    names = ""
    if known is not None:
        names = list(known(tvm.target.Target({"kind": "llvm", "mtriple": triple})))
        names = f" (LLVM knows {len(names)}, e.g. {', '.join(names[:8])}, ...)"
    raise EdgecError(f"unknown --mcpu '{str(mcpu)[:60]}' for target '{spec.name}' "
                     f"({triple}){names}")


def int8_isa(spec: TargetSpec, options: dict | None = None) -> str | None:
    """The integer dot-product ISA the CPU backend uses for ``spec`` (None for GPUs)."""
    if spec.device != "cpu":
        return None
    return select_isa(make_target(spec, options)).name


def build(model: onnx.ModelProto, spec: TargetSpec, lib_path: Path,
          options: dict | None = None, use_tuning_db: bool = True) -> BuildResult:
    """Compile ``model`` for ``spec`` into the shared library ``lib_path``.

    Returns what the build did (:class:`~edgec.targets.records.BuildRecord`), the timings and
    the resolved TVM target (as JSON) for the manifest.
    """
    spec.check_toolchain()
    target = make_target(spec, options)
    timings = BuildTimings()
    t0 = time.perf_counter()
    mod = to_relax(model)
    timings.import_s = time.perf_counter() - t0
    record = BuildRecord()
    if use_tuning_db and spec.device == "cpu":
        record.tuning_db = find_db(spec, options)
    t0 = time.perf_counter()
    try:
        ex = _relax_build(spec, mod, target, _pipeline(spec, target, record))
    except EdgecError:
        if "tuned" not in record.kernels.values():
            raise
        # A tuned schedule that does not build here (a database written by another version,
        # or before candidates were built under this pipeline's configuration): build each
        # alone, keep the default kernel for those that fail, and build again.
        record = BuildRecord(tuning_db=record.tuning_db, verify_tuned=True)
        ex = _relax_build(spec, mod, target, _pipeline(spec, target, record))
    timings.build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kwargs = {"cc": spec.cross_compiler} if spec.cross_compiler else {}
    try:
        ex.export_library(str(lib_path), **kwargs)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise EdgecError(f"linking the {spec.name} library failed: "
                         f"{msg[-1] if msg else type(e).__name__}"[:400]) from None
    timings.export_s = time.perf_counter() - t0
    return BuildResult(timings, json.loads(str(target)), record)


def _pipeline(spec: TargetSpec, target, record: BuildRecord):
    return sequential(target, spec.phases(target, record, tuning_db=record.tuning_db))


def _relax_build(spec: TargetSpec, mod, target, pipeline):
    err = None
    with NativeOutput() as out:
        try:
            with build_context():
                ex = relax.build(mod, target=target, relax_pipeline=pipeline)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            err = (f"TVM build for '{spec.name}' failed: {type(e).__name__}: "
                   f"{msg[-1] if msg else ''}"[:400])
    out.raise_for(err)
    return ex


def tvm_version() -> str:
    return tvm.__version__
