"""Tuning flow: database per target, keep-faster choice, reuse at compile, export/import.

The tests that actually tune (a tiny model, 8 trials) take ~1 minute and are marked slow:
``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import json

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
