"""The pass toolkit (passes/_toolkit.py), the fp16 pass and its quantize.mode=fp16 alias, and
the import structure of passes/."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_bn_model, make_model, ort_run
from edgec.core.graph import provenance
from edgec.passes import PassReport, copy_model, make_config, run_pass
from edgec.passes._toolkit import (UnionFind, chunking, drop_unused_initializers,
                                   report_removed, rows_per_batch, run_first_output, splice)

PASSES = Path(__file__).resolve().parents[1] / "passes"


# ----------------------------------------------------------------------------- toolkit

def test_union_find_keeps_the_first_root_or_the_preferred_one():
    uf = UnionFind()
    uf.union("a", "b")
    uf.union("c", "b")
    assert {uf.find(x) for x in "abc"} == {"c"}
    assert uf.find("d") == "d"  # created on first use
    m = UnionFind(prefer=min)
    for x in (3, 1, 2):
        m.add(x)
    m.union(3, 2)
    m.union(2, 1)
    assert {m.find(x) for x in (1, 2, 3)} == {1}


def _two_relus():
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="r1"),
                       helper.make_node("Relu", ["y"], ["z"], name="r2")],
                      [("x", [1, 4])], [("z", [1, 4])],
                      {"unused": np.ones(3, np.float32), "w": np.ones(4, np.float32)})


def test_drop_unused_initializers_and_splice():
    m = _two_relus()
    drop_unused_initializers(m)
    assert [t.name for t in m.graph.initializer] == []
    m = _two_relus()
    add = helper.make_node("Add", ["y", "w"], ["z"], name="add")
    splice(m, {"r2": [add]}, [numpy_helper.from_array(np.zeros(2, np.float32), "dead")])
    assert [n.name for n in m.graph.node] == ["r1", "add"]
    assert [t.name for t in m.graph.initializer] == ["w"]
    x = np.arange(4, dtype=np.float32).reshape(1, 4) - 2
    np.testing.assert_array_equal(ort_run(m, {"x": x})[0], np.maximum(x, 0) + 1)


def test_report_removed_names_each_dropped_node_once():
    m = _two_relus()
    out = copy_model(m)
    splice(out, {"r2": []})
    report = PassReport("t")
    report_removed(report, m, out, "gone")
    assert report.rewritten == [{"node": "r2", "op": "Relu", "what": "gone"}]
    assert report.modified


def test_chunking_and_rows_per_batch():
    m = conv_bn_model(batch=2)
    calib = {"x": np.zeros((10, 3, 12, 12), np.float32)}
    assert chunking(m, calib, 1000, 32) == (10, 2)       # the model's fixed batch
    assert chunking(m, calib, 4, 32) == (4, 2)
    dyn = conv_bn_model(batch=1)
    dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert chunking(dyn, calib, 1000, 32) == (10, 32)
    assert rows_per_batch(100, 10, 4) == 34              # 3 batches
    assert rows_per_batch(100, 0, 4) == 100


def test_run_first_output_pads_a_fixed_batch():
    m = conv_bn_model(batch=4)
    x = np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)
    got = run_first_output(m, {"x": x}, batch=32)
    assert got.shape == (6, 10)
    ref = np.concatenate([ort_run(m, {"x": x[:4]})[0],
                          ort_run(m, {"x": x[[4, 5, 4, 5]]})[0][:2]])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- fp16

def _strip_provenance(m: onnx.ModelProto) -> bytes:
    m = copy_model(m)
    for n in m.graph.node:
        del n.metadata_props[:]
    return m.SerializeToString(deterministic=True)


def test_fp16_pass_and_the_quantize_alias_rewrite_alike():
    m = conv_bn_model()
    for opts in ({}, {"compute": "fp32"}, {"keep_io_types": "false"}, {"block_ops": "Gemm"},
                 {"exclude": "conv"}):
        a, ra = run_pass("fp16", m, make_config("fp16", opts))
        b, rb = run_pass("quantize", m, make_config("quantize", {"mode": "fp16", **opts}))
        assert _strip_provenance(a) == _strip_provenance(b), opts
        assert ra.details == rb.details
        assert [r["what"] for r in ra.rewritten] == [r["what"] for r in rb.rewritten]
        assert {provenance(n).get("edgec.pass") for n in a.graph.node} <= {"fp16", None}
        assert {provenance(n).get("edgec.pass") for n in b.graph.node} <= {"quantize", None}
        assert ra.name == "fp16" and rb.name == "quantize"


def test_fp16_pass_options_and_skip_reasons():
    m = conv_bn_model()
    out, rep = run_pass("fp16", m, make_config("fp16", {"block_ops": "Gemm", "exclude": "conv"}))
    reasons = {s["node"]: s["reason"] for s in rep.skipped}
    assert reasons["fc"] == "in fp16.block_ops (kept in float32)"
    assert reasons["conv"] == "in fp16.exclude (kept in float32)"
    _, rep = run_pass("quantize", m, make_config("quantize", {"mode": "fp16",
                                                              "block_ops": "Gemm"}))
    assert {s["node"]: s["reason"] for s in rep.skipped}["fc"] == \
        "in quantize.block_ops (kept in float32)"
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    got, ref = ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_fp16_output_is_float16_without_keep_io_types():
    out, _ = run_pass("fp16", conv_bn_model(), make_config("fp16", {"keep_io_types": "false"}))
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


# ----------------------------------------------------------------------------- structure

def _relative_imports(path: Path) -> set[str]:
    """The passes/ modules a module imports (``from .x import``, ``from . import x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names if (PASSES / f"{a.name}.py").exists())
    return out


def test_no_import_cycle_among_passes():
    graph = {p.stem: _relative_imports(p) for p in PASSES.glob("*.py") if p.stem != "__init__"}
    assert "quantize" not in graph["fp16"]
    state: dict[str, int] = {}

    def visit(n, stack):
        if state.get(n) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(stack + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph.get(n, ()):
            visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])


def test_pass_files_and_functions_stay_short():
    for p in PASSES.glob("*.py"):
        src = p.read_text()
        assert len(src.splitlines()) <= 600, p.name
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{p.name}: {node.name}"
