"""Tuning flow: database per target, keep-faster choice, reuse at compile, export/import.

The tests that actually tune (a tiny model, 8 trials) take ~1 minute and are marked slow:
``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compile_to, conv_bn_model
from edgec.core.errors import EdgecError
from edgec.targets import get_target


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tuning_refuses_targets_it_cannot_run(cache):
    from edgec.core.importer import normalize
    from edgec.targets.tuning import tune

    m, _ = normalize(conv_bn_model())
    with pytest.raises(EdgecError, match="rpi4.*cannot run on this machine"):
        tune(m, get_target("rpi4"), trials=4)
    with pytest.raises(EdgecError, match="positive"):
        tune(m, get_target("x86"), trials=0)


def test_export_import_errors(cache, tmp_path):
    from edgec.targets.tuning import export_db, import_db

    with pytest.raises(EdgecError, match="no tuning database"):
        export_db(get_target("x86"), tmp_path / "db.zip")
    with pytest.raises(EdgecError, match="not found"):
        import_db(get_target("x86"), tmp_path / "missing.zip")
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(EdgecError, match="not an edgec tuning database"):
        import_db(get_target("x86"), tmp_path / "bad.zip")


def test_db_dir_depends_on_target(cache):
    from edgec.targets.tuning import db_dir

    a = db_dir(get_target("x86"))
    b = db_dir(get_target("x86"), {"mcpu": "haswell"})
    assert a != b and a.parent == b.parent == cache / "tuning"


def _tasks(model, tmp: Path, target_name="x86"):
    """The tuning tasks of ``model`` as ``edgec tune`` sees them (after the compile's default
    passes): ``(target, {name: task module})``."""
    import onnx

    from edgec.driver.compiler import CompileOptions, prepare
    from edgec.targets.backend import make_target
    from edgec.targets.tuning import tasks_of
    from edgec.targets.tuning_db import task_module

    onnx.save(model, tmp / "m.onnx")
    norm = prepare(tmp / "m.onnx", CompileOptions(target=target_name)).result.model
    target = make_target(get_target(target_name))
    names, funcs, _ = tasks_of(norm, target)
    return target, {n: task_module(f) for n, (_, f) in zip(names, funcs)}


def _unbuildable_stem(tmod):
    """A schedule of the stem convolution that builds with TVM's defaults but not under the
    model build's configuration (LoopPartition splits the vectorized pad loop at its bounds
    test, which then cannot vectorize): what random tuning candidates did in CI."""
    import tvm

    sch = tvm.s_tir.Schedule(tmod)
    pad, conv = sch.get_sblock("edgec_pad_p0"), sch.get_sblock("edgec_conv2d_stem")
    n, o, y, x, *_ = sch.get_loops(conv)
    x0, x1 = sch.split(x, [None, 2])
    sch.reorder(n, o, y, x0, x1)
    sch.compute_at(pad, x0)
    sch.vectorize(sch.get_loops(pad)[-1])
    return sch


def test_tuning_builder_rejects_what_the_model_build_cannot_build(tmp_path):
    import tvm

    from edgec.targets.tuning import _f_build

    target, tasks = _tasks(conv_bn_model(), tmp_path)
    sch = _unbuildable_stem(tasks["fused_conv2d_stem_add_relu"])
    tvm.build(sch.mod, target=target)  # TVM's default configuration builds it
    with pytest.raises(Exception, match="vectorize"):
        _f_build(sch.mod, target, None)  # the tuning builder must not


def test_compile_keeps_default_where_a_tuned_schedule_does_not_build(cache, tmp_path, capsys):
    """A database holding a tuned schedule that fails under the model build (written by
    another version, say): the compile keeps the default kernel for that function, keeps the
    tuned ones that build, says which it rejected, and its answers stay right."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgec.driver.cli.compile import print_report
    from edgec.runtime import OrtSession, Session
    from edgec.targets.tuning_db import database, db_dir, save_choices, task_key

    model = conv_bn_model()
    target, tasks = _tasks(model, tmp_path)
    path = db_dir(get_target("x86"))
    db = database(path)
    dense = tvm.s_tir.Schedule(tasks["fused_dense_packed_add1"])  # plain loops, one parallel
    dense.parallel(dense.get_loops(dense.get_child_blocks(dense.get_sblock("root"))[0])[0])
    scheds = {"fused_conv2d_stem_add_relu": _unbuildable_stem(tasks["fused_conv2d_stem_add_relu"]),
              "fused_dense_packed_add1": dense}
    choices = {}
    for name, sch in scheds.items():
        tmod = tasks[name]
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(tmod), [1e-6], target,
            ms.arg_info.ArgInfo.from_prim_func(tmod["main"])))
        choices[task_key(tmod)] = {"task": name, "default_s": 1.0, "tuned_s": 1e-6,
                                   "use": "tuned"}
    save_choices(path, choices)

    report = compile_to(model, tmp_path / "a")
    k = report["kernels"]
    assert k["tuning_db"] == str(path)
    assert set(k["tuned_rejected"]) == {"fused_conv2d_stem_add_relu"}
    assert "vectorize" in k["tuned_rejected"]["fused_conv2d_stem_add_relu"]
    assert k["functions"]["fused_dense_packed_add1"] == "tuned"
    assert k["functions"]["fused_conv2d_stem_add_relu"] != "tuned"
    print_report(report, "m.onnx", tmp_path / "a")
    assert "1 tuned schedule(s) from the tuning database did not build" in capsys.readouterr().out
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(Session(tmp_path / "a").run(None, {"x": x})[0],
                               OrtSession(model).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tune_reuse_export_import_and_forced_tuned(cache, tmp_path, monkeypatch):
    from edgec.core.importer import normalize
    from edgec.runtime import OrtSession, Session
    from edgec.targets.tuning import CHOICES, db_dir, export_db, import_db, tune

    model = conv_bn_model()
    norm, _ = normalize(model)
    spec = get_target("x86")
    summary = tune(norm, spec, trials=8, progress=False)
    assert summary["tasks"] == 2  # the conv and the gemm
    path = db_dir(spec)
    choices = json.loads((path / CHOICES).read_text())
    assert len(choices) == 2
    for c in choices.values():
        assert c["default_s"] and c["default_s"] > 0
        assert c["use"] in {"tuned", "default"}
        if c["use"] == "tuned":  # only where it measured faster
            assert c["tuned_s"] < c["default_s"]

    # a later compile finds the database by itself
    report = compile_to(model, tmp_path / "a")
    assert report["kernels"]["tuning_db"] == str(path)

    # force the tuned schedules where records exist: the result must still be right
    tuned_any = False
    for c in choices.values():
        if c["tuned_s"] is not None:
            c["use"] = "tuned"
            tuned_any = True
    (path / CHOICES).write_text(json.dumps(choices))
    report = compile_to(model, tmp_path / "b")
    if tuned_any:
        assert report["kernels"]["counts"].get("tuned", 0) >= 1
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(Session(tmp_path / "b").run(None, {"x": x})[0],
                               OrtSession(model).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)

    # ship it: export, import into an empty cache
    export_db(spec, tmp_path / "db.zip")
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "other"))
    n = import_db(spec, tmp_path / "db.zip")
    assert n >= 1
    assert json.loads((db_dir(spec) / CHOICES).read_text()) == choices


@pytest.mark.slow
def test_cli_compile_with_tuning_budget(cache, tmp_path):
    import subprocess
    import sys

    import onnx

    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    res = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile",
                          str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"),
                          "--tune-trials", "4"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tuning"]["tasks"] == 2
    assert report["kernels"]["tuning_db"]
    assert "tune_s" in report["timings"]
