"""CLI behaviour: every user error is one line on stderr, exit 2, nothing written, the input
model untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import conv_bn_model, edgec_here, make_model


def edgec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgec.driver.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_user_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("edgec: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def nothing_written(folder: Path, before: set):
    assert set(p.name for p in folder.iterdir()) == before


@pytest.fixture
def model_dir(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    return tmp_path


def test_missing_file(model_dir):
    before = set(p.name for p in model_dir.iterdir())
    res = edgec("compile", model_dir / "nope.onnx", "-o", model_dir / "out")
    assert_user_error(res, "not found", "nope.onnx")
    nothing_written(model_dir, before)


def test_not_onnx(model_dir):
    bad = model_dir / "bad.onnx"
    bad.write_text("this is not a protobuf at all\n" * 10)
    before = set(p.name for p in model_dir.iterdir())
    res = edgec("compile", bad, "-o", model_dir / "out")
    assert_user_error(res, "not an ONNX model")
    nothing_written(model_dir, before)


def test_truncated_protobuf(model_dir):
    data = (model_dir / "m.onnx").read_bytes()
    cut = model_dir / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    before = set(p.name for p in model_dir.iterdir())
    res = edgec("compile", cut, "-o", model_dir / "out")
    assert_user_error(res, "cut.onnx")
    assert "truncated" in res.stderr or "not an ONNX" in res.stderr
    nothing_written(model_dir, before)


def test_unsupported_op_named(model_dir):
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="r"),
                    helper.make_node("Col2Im", ["y", "s", "b"], ["z"], name="weird_node")],
                   [("x", [1, 4, 6])], [("z", [1, 1, 3, 3])],
                   {"s": np.array([3, 3], np.int64), "b": np.array([2, 2], np.int64)}, opset=18)
    p = model_dir / "unsup.onnx"
    onnx.save(m, p)
    before = set(p.name for p in model_dir.iterdir())
    res = edgec("compile", p, "-o", model_dir / "out")
    assert_user_error(res, "Col2Im", "weird_node")
    nothing_written(model_dir, before)


def test_unknown_target(model_dir):
    res = edgec("compile", model_dir / "m.onnx", "--target", "pdp11", "-o", model_dir / "o")
    assert_user_error(res, "unknown target 'pdp11'")
    assert not (model_dir / "o").exists()


def test_unknown_pass_and_key(model_dir):
    res = edgec("compile", model_dir / "m.onnx", "--passes", "nosuch", "-o", model_dir / "o")
    assert_user_error(res, "unknown pass 'nosuch'")
    res = edgec("compile", model_dir / "m.onnx", "--set", "fold-bn.nokey=1", "-o",
                model_dir / "o")
    assert_user_error(res, "unknown option 'nokey'", "fold-bn")
    res = edgec("compile", model_dir / "m.onnx", "--set", "fold-bn.conv=maybe", "-o",
                model_dir / "o")
    assert_user_error(res, "fold-bn.conv")
    res = edgec("compile", model_dir / "m.onnx", "--preset", "nosuch", "-o", model_dir / "o")
    assert_user_error(res, "unknown preset")
    assert not (model_dir / "o").exists()


def test_bad_calib(model_dir):
    np.savez(model_dir / "wrongname.npz", y=np.zeros((4, 3, 12, 12), np.float32))
    np.savez(model_dir / "wrongshape.npz", x=np.zeros((4, 3, 10, 12), np.float32))
    np.savez(model_dir / "nan.npz", x=np.full((4, 3, 12, 12), np.nan, np.float32))
    np.savez(model_dir / "ints.npz", x=np.zeros((4, 3, 12, 12), np.int64))
    np.savez(model_dir / "huge.npz", x=np.full((4, 3, 12, 12), 1e300, np.float64))
    np.savez(model_dir / "norows.npz", x=np.zeros((0, 3, 12, 12), np.float32))
    before = set(p.name for p in model_dir.iterdir())
    for f, needle in [("wrongname.npz", "lacks input(s) x"), ("wrongshape.npz", "shape"),
                      ("nan.npz", "NaN"), ("ints.npz", "dtype"), ("missing.npz", "not found"),
                      ("huge.npz", "beyond float32"), ("norows.npz", "0 rows")]:
        res = edgec_here("compile", model_dir / "m.onnx", "--calib", model_dir / f, "-o",
                         model_dir / "o")
        assert_user_error(res, needle)
    nothing_written(model_dir, before)


def test_dynamic_input_needs_shape(tmp_path):
    m = conv_bn_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(m, tmp_path / "dyn.onnx")
    res = edgec("compile", tmp_path / "dyn.onnx", "-o", tmp_path / "o")
    assert_user_error(res, "input 'x'", "--input-shape")
    res = edgec("compile", tmp_path / "dyn.onnx", "--input-shape", "nosuch=1x3x12x12",
                "-o", tmp_path / "o")
    assert_user_error(res, "'nosuch'")
    res = edgec("compile", tmp_path / "dyn.onnx", "--input-shape", "x=1x3", "-o",
                tmp_path / "o")
    assert_user_error(res, "rank")
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_foreign_folder(model_dir):
    (model_dir / "precious").mkdir()
    (model_dir / "precious" / "data.txt").write_text("keep me")
    res = edgec("compile", model_dir / "m.onnx", "-o", model_dir / "precious")
    assert_user_error(res, "not an edgec artifact")
    assert (model_dir / "precious" / "data.txt").read_text() == "keep me"


def test_compile_run_check_bench_end_to_end(model_dir):
    src = model_dir / "m.onnx"
    digest = sha(src)
    res = edgec("compile", src)
    assert res.returncode == 0, res.stderr
    out = model_dir / "m.edgec" / "x86"  # the documented default
    assert {p.name for p in out.iterdir()} == {"model.so", "model.onnx", "manifest.json",
                                              "report.json"}
    assert sha(src) == digest  # input never modified
    # no staging leftovers beside the artifact
    assert [p.name for p in (model_dir / "m.edgec").iterdir()] == ["x86"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 12, 12], "dtype": "float32"}]
    assert manifest["source"]["sha256"] == digest
    assert {"edgec", "onnx", "tvm"} <= set(manifest["versions"])
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["macs"] == report["after"]["macs"] > 0
    assert [p["name"] for p in report["passes"]][:5] == ["fold-constants", "split-variadic",
                                                         "eliminate-identity", "fold-bn",
                                                         "cleanup"]
    assert {"params", "macs", "bytes"} <= set(report["before"])

    rng = np.random.default_rng(1)
    np.savez(model_dir / "val.npz", x=rng.standard_normal((7, 3, 12, 12)).astype(np.float32),
             labels=rng.integers(0, 10, 7))
    res = edgec("run", out, "--data", model_dir / "val.npz", "-o", model_dir / "pred.npz")
    assert res.returncode == 0, res.stderr
    pred = np.load(model_dir / "pred.npz")["logits"]
    assert pred.shape == (7, 10)

    res = edgec("check", src, out, "--data", model_dir / "val.npz", "--max-drop", "0",
                "--json", model_dir / "check.json")
    assert res.returncode == 0, res.stdout + res.stderr
    chk = json.loads((model_dir / "check.json").read_text())
    assert chk["ok"] and chk["top1_agreement"] == 1.0 and chk["accuracy_drop"] == 0.0
    assert chk["outputs"]["logits"]["cosine"] > 0.99999
    assert set(chk) >= {"outputs", "top1_agreement", "accuracy", "accuracy_drop", "ok"}

    res = edgec("bench", src, out, "--repeat", "3")
    assert res.returncode == 0, res.stderr
    assert "ratio onnxruntime/edgec" in res.stdout


def test_check_fails_beyond_budget(model_dir, tmp_path):
    """A compiled artifact of a *different* model must fail the check with exit 1."""
    src = model_dir / "m.onnx"
    other = tmp_path / "other"
    other.mkdir()
    onnx.save(conv_bn_model(np.random.default_rng(99)), other / "o.onnx")
    assert edgec("compile", other / "o.onnx", "-o", other / "out").returncode == 0
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((6, 3, 12, 12)).astype(np.float32))
    res = edgec("check", src, other / "out", "--data", tmp_path / "val.npz")
    assert res.returncode == 1
    assert "FAILED" in res.stdout


def test_listing_commands():
    res = edgec("passes")
    assert res.returncode == 0 and "fold-bn" in res.stdout and "presets:" in res.stdout
    res = edgec("targets")
    assert res.returncode == 0
    for t in ["x86", "arm64", "rpi4", "rpi5", "jetson-orin", "cuda"]:
        assert t in res.stdout


def test_data_and_zoo_commands(tmp_path):
    from edgec.models import fashion_mnist

    res = edgec("zoo", "tiny_cnn", tmp_path / "t.onnx")
    assert res.returncode == 0, res.stderr
    assert onnx.load(tmp_path / "t.onnx").graph.node
    assert_user_error(edgec("zoo", "nosuch", tmp_path / "x.onnx"), "unknown zoo model")
    if fashion_mnist.available():
        res = edgec("data", "fashion-mnist", tmp_path / "v.npz", "--n", "10")
        assert res.returncode == 0, res.stderr
        z = np.load(tmp_path / "v.npz")
        assert z["input"].shape == (10, 1, 28, 28) and z["labels"].shape == (10,)


# ------------------------------------------------------------------ issue 21: exit codes
def test_unknown_mcpu_is_a_user_error(model_dir):
    res = edgec("compile", model_dir / "m.onnx", "--mcpu", "not-a-cpu", "-o", model_dir / "o")
    assert_user_error(res, "unknown --mcpu 'not-a-cpu'")
    res = edgec("compile", model_dir / "m.onnx", "--target", "rpi4", "--mcpu", "skylake",
                "--no-build", "-o", model_dir / "o")
    assert_user_error(res, "unknown --mcpu 'skylake'", "rpi4")
    assert not (model_dir / "o").exists()


def test_run_user_errors(model_dir):
    assert edgec("compile", model_dir / "m.onnx", "-o", model_dir / "art").returncode == 0
    np.savez(model_dir / "empty.npz", x=np.zeros((0, 3, 12, 12), np.float32))
    np.savez(model_dir / "ok.npz", x=np.zeros((2, 3, 12, 12), np.float32))
    np.savez(model_dir / "ints.npz", x=np.zeros((2, 3, 12, 12), np.int64))
    assert_user_error(edgec_here("run", model_dir / "art", "--data", model_dir / "empty.npz",
                                 "-o", model_dir / "p.npz"), "0 rows")
    assert_user_error(edgec_here("run", model_dir / "art", "--data", model_dir / "ok.npz", "-o",
                                 model_dir), "not a folder")
    assert_user_error(edgec_here("run", model_dir / "art", "--data", model_dir / "ints.npz",
                                 "-o", model_dir / "p.npz"), "dtype int64")
    assert not (model_dir / "p.npz").exists()
    res = edgec("run", model_dir / "art", "--data", model_dir / "ok.npz", "-o",
                model_dir / "p.npz", "--threads", "64")
    assert res.returncode == 0, res.stderr


def test_memory_error_is_a_user_error(model_dir, monkeypatch, capsys):
    from edgec.driver import compiler as compiler_mod
    from edgec.driver.cli import main

    def huge(*a, **kw):
        raise MemoryError()

    monkeypatch.setattr(compiler_mod, "compile_model", huge)
    assert main(["compile", str(model_dir / "m.onnx"), "-o", str(model_dir / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]
    res = edgec("compile", model_dir / "m.onnx", "--input-shape", "x=99999999999999999999x3x12x12",
                "-o", model_dir / "o")
    assert_user_error(res, "too large")


def test_native_output_captured_on_errors_and_interrupts(capfd):
    import os
    import signal

    from tvm import relax

    from edgec.core.errors import EdgecError
    from edgec.targets.backend import NativeOutput

    def leaky():  # a BlockBuilder left with an open block warns from C++ when destroyed
        bb = relax.BlockBuilder()
        bb._begin_dataflow_block()
        os.write(2, b"Error converting operator Mul\n")
        raise ValueError("frontend failed")

    with pytest.raises(EdgecError, match="frontend failed"):
        with NativeOutput() as out:
            try:
                leaky()
            except ValueError as e:
                err = str(e)
        out.raise_for(err)
    assert capfd.readouterr().err == ""
    # Ctrl-C that TVM turns into another exception still ends as KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with NativeOutput() as out:
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                raise RuntimeError("TVM: interrupted in a callback") from None
    with NativeOutput() as out:
        os.write(2, b"a warning\n")
    out.raise_for(None)
    assert capfd.readouterr().err == "a warning\n"


def test_check_scores_the_named_output(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "Wb"], ["boxes"]),
             helper.make_node("Gemm", ["x", "Wp"], ["s"]),
             helper.make_node("Softmax", ["s"], ["probs"], axis=1)]
    m = make_model(nodes, [("x", [2, 8])], [("boxes", [2, 4]), ("probs", [2, 3])],
                   {"Wb": rng.standard_normal((8, 4)).astype(np.float32),
                    "Wp": rng.standard_normal((8, 3)).astype(np.float32)})
    onnx.save(m, tmp_path / "det.onnx")
    assert edgec("compile", tmp_path / "det.onnx", "-o", tmp_path / "art").returncode == 0
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((6, 8)).astype(np.float32),
             labels=rng.integers(0, 3, 6))
    args = ("check", tmp_path / "det.onnx", tmp_path / "art", "--data", tmp_path / "val.npz")
    res = edgec(*args, "--output", "probs", "--max-drop", "0", "--json", tmp_path / "c.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "accuracy of output 'probs'" in res.stdout
    chk = json.loads((tmp_path / "c.json").read_text())
    assert chk["scored_output"] == "probs" and chk["accuracy_drop"] == 0.0
    # labels 0..2 against 4 box coordinates scored as classes would give a number: refused
    np.savez(tmp_path / "val5.npz", x=rng.standard_normal((6, 8)).astype(np.float32),
             labels=np.array([0, 1, 2, 3, 4, 4]))
    assert_user_error(edgec_here(*args[:3], "--data", tmp_path / "val5.npz"), "output 'boxes'",
                      "--output")
    assert_user_error(edgec_here(*args, "--output", "nope"), "'nope' is not an output")


def test_bad_pass_option_fails_before_tvm_or_the_model_loads(tmp_path):
    """A bad --set is refused from the pass's config alone: TVM is not loaded, and the model
    (here not even ONNX) is not read."""
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model")
    code = ("import sys; from edgec.driver.cli import main; "
            f"rc = main(['compile', {str(bad)!r}, '--passes', 'cluster', '--set', "
            f"'cluster.bits=0', '-o', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'tvm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.stdout.split() == ["2", "False"], (res.stdout, res.stderr)
    assert "bits must be within 1..4" in res.stderr and not (tmp_path / "o").exists()


def test_tvm_loads_without_torch_and_torch_still_imports():
    """TVM's modules are refused torch at their import (2-3 s saved per process); the zoo's
    exporters still get it afterwards."""
    pytest.importorskip("torch")
    code = ("import sys, edgec, tvm; from tvm import relax; "
            "print('torch' in sys.modules); import torch; print(torch.zeros(2).sum().item())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["False", "0.0"], res
