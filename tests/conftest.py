"""Shared fixtures: small ONNX graph builders and a compile helper."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.driver.board import LocalBoards

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
# The emulated aarch64 board (edgec board --install) lives in the user's cache, not the tests'.
if "EDGEC_EMULATOR" not in os.environ:
    os.environ["EDGEC_EMULATOR"] = str(Path(os.environ.get("EDGEC_CACHE") or
                                            Path.home() / ".cache" / "edgec") / "board" / "aarch64")
# Hermetic: no tuning database (or zoo export cache) of the user's leaks into the tests.
if "EDGEC_TEST_CACHE" in os.environ:
    os.environ["EDGEC_CACHE"] = os.environ["EDGEC_TEST_CACHE"]
else:
    import tempfile

    os.environ["EDGEC_CACHE"] = tempfile.mkdtemp(prefix="edgec-test-cache-")


def make_model(nodes, inputs, outputs, inits=(), opset=13, ir_version=8) -> onnx.ModelProto:
    """inputs/outputs: [(name, shape)] float32; inits: {name: array}."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


def conv_bn_model(rng=None, batch=1, c=3, k=8, hw=12, opset=13) -> onnx.ModelProto:
    rng = rng or np.random.default_rng(0)
    inits = {
        "W": rng.standard_normal((k, c, 3, 3)).astype(np.float32) * 0.3,
        "B": rng.standard_normal(k).astype(np.float32),
        "g": (rng.random(k) + 0.5).astype(np.float32),
        "b": rng.standard_normal(k).astype(np.float32),
        "m": (rng.standard_normal(k) * 0.1).astype(np.float32),
        "v": (rng.random(k) + 0.5).astype(np.float32),
        "G": rng.standard_normal((10, k)).astype(np.float32),
        "C": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["yb"], name="bn"),
        helper.make_node("Relu", ["yb"], ["z"], name="relu"),
        helper.make_node("GlobalAveragePool", ["z"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "C"], ["logits"], transB=1, name="fc"),
    ]
    return make_model(nodes, [("x", [batch, c, hw, hw])], [("logits", [batch, 10])], inits,
                      opset=opset)


def host_has(*features) -> bool:
    """Whether this machine's CPU has every LLVM feature named (``avx512f``, ``avx512vnni``)."""
    from edgec.targets import get_target
    from edgec.targets.backend import make_target
    from tvm.target.codegen import target_has_features

    t = make_target(get_target("x86"), {})
    return all(target_has_features(f, t) for f in features)


def ort_run(model, feeds):
    """onnxruntime's answer: a QDQ model runs with graph optimizations off, the exact QDQ
    arithmetic on every host (its fused int8 kernels saturate on CPUs without VNNI)."""
    from edgec.runtime import OrtSession

    return OrtSession(model).run(None, feeds)


@pytest.fixture
def tiny_model_path(tmp_path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(conv_bn_model(), p)
    return p


def compile_to(model, out: Path, target="x86", **kw):
    from edgec.driver.compiler import CompileOptions, compile_model

    path = model
    if isinstance(model, onnx.ModelProto):
        path = out.parent / f"{out.name}_src.onnx"
        onnx.save(model, path)
    return compile_model(path, out, CompileOptions(target=target, **kw))


def compile_and_compare(model, out: Path, target="x86", seed: int = 3, **kw):
    """Compile ``model`` into ``out`` (``kw``: compile options) and, for x86, check it against
    onnxruntime on random inputs (rtol 1e-4, atol 1e-4 * max|ref|); returns the report."""
    from edgec.runtime import OrtSession, Session

    report = compile_to(model, out, target=target, **kw)
    if target != "x86":
        return report
    sess = Session(out)
    rng = np.random.default_rng(seed)
    feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32)
             for i in sess.input_specs}
    ref = OrtSession(model).run(None, feeds)
    got = sess.run(None, feeds)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(r).max()))
    return report


def edgec_here(*args):
    """``edgec ARGS`` run in this process (a child costs ~2 s of imports per call), with what a
    child would show: the exit status, and stdout/stderr captured both at Python's level and
    at the file descriptors (native output, warnings printed as a child prints them)."""
    import contextlib
    import io
    import subprocess
    import tempfile
    import warnings

    from edgec.driver.cli import main

    py_out, py_err = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        saved = os.dup(1), os.dup(2)
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err), \
                    warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = lambda m, c, f, n, file=None, line=None: print(
                    warnings.formatwarning(m, c, f, n, line), file=sys.stderr, end="")
                try:
                    rc = main([str(a) for a in args])
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 1
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fo.seek(0)
        fe.seek(0)
        out = py_out.getvalue() + fo.read().decode(errors="replace")
        err = py_err.getvalue() + fe.read().decode(errors="replace")
    return subprocess.CompletedProcess(list(args), rc, out, err)


def assert_compile_refuses(src: Path, args: list[str], needle: str, out: Path) -> None:
    """``edgec compile src args --no-build -o out`` in a child process fails as the CLI
    promises for bad options: exit 2, one ``edgec: error:`` line naming ``needle``, no
    artifact."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile", str(src), *args,
                          "--no-build", "-o", str(out)], capture_output=True, text=True,
                         timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("edgec: error: ") and needle in lines[0], lines[0]
    assert not out.exists()


# -- an RPC tracker and emulated aarch64 boards on loopback ---------------------------------------

Boards = LocalBoards  # (test_tune_rpc starts trackers of its own)


def board_missing() -> str | None:
    from edgec.driver.board import missing_reason

    try:
        import tornado  # noqa: F401 - TVM's tracker needs it
    except ImportError:
        return "TVM's RPC tracker needs tornado (pip install -e '.[test]')"
    return missing_reason()


@pytest.fixture(scope="session")
def rpc_board():
    """``(tracker address, key)`` of one emulated rpi4 board (skips where none can run)."""
    reason = board_missing()
    if reason:
        pytest.skip(f"no emulated aarch64 board: {reason}")
    b = Boards()
    try:
        b.add("rpi4")
        yield b
    finally:
        b.close()
