"""``edgec compile --max-drop``: the search over pass settings within an accuracy budget.

A small synthetic classifier (conv -> relu -> gemm -> relu -> gemm, low-rank-ish weights) whose
labels are its own top-1 (accuracy 100 % by construction); validation rows and a held-out
split drawn from the same distribution. No TVM build (``build=False``): the search scores in
onnxruntime, and the build itself is covered by the compile tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model, ort_run
from edgec.core.errors import EdgecError
from edgec.driver.compiler import CompileOptions
from edgec.driver.search import frontier, run_search, upper_bound_drop, wilson_upper

B = 16


def _model(seed=0):
    rng = np.random.default_rng(seed)

    def lowrankish(shape, r):
        a = rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, int(np.prod(shape[1:]))))
        a += 0.05 * rng.standard_normal(a.shape)
        return (a / np.sqrt(a.shape[1])).reshape(shape).astype(np.float32)

    inits = {"W1": lowrankish((16, 1, 3, 3), 6), "b1": np.zeros(16, np.float32),
             "W2": lowrankish((32, 16 * 8 * 8), 8).T.copy(), "b2": np.zeros(32, np.float32),
             "W3": lowrankish((4, 32), 4).T.copy(), "b3": np.zeros(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2", "b2"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
             helper.make_node("Gemm", ["hr", "W3", "b3"], ["y"], name="fc2")]
    return make_model(nodes, [("x", [B, 1, 8, 8])], [("y", [B, 4])], inits)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    m = _model()
    src = tmp / "m.onnx"
    onnx.save(m, src)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1600, 1, 8, 8)).astype(np.float32)
    y = np.concatenate([ort_run(m, {"x": x[i:i + B]})[0].argmax(1) for i in range(0, len(x), B)])
    calib = {"x": x[:200]}
    val = {"x": x[200:800], "labels": y[200:800]}
    held = (x[800:], y[800:])
    return src, calib, val, held, tmp


def _search(task, name, max_drop, passes=("prune", "lowrank")):
    src, calib, val, _, tmp = task
    opts = CompileOptions(passes=list(passes), calib=calib, build=False, progress=False)
    return run_search(src, tmp / name, opts, val, max_drop, "macs", minutes=1.0,
                      search_passes=list(passes))


def _accuracy(artifact, held):
    m = onnx.load(artifact / "model.onnx")
    x, y = held
    p = np.concatenate([ort_run(m, {"x": x[i:i + B]})[0].argmax(1) for i in range(0, len(x), B)])
    return float(np.mean(p == y))


def test_budget_zero_agrees_with_the_original(task):
    rep = _search(task, "zero", 0.0)
    c = rep["search"]["chosen"]
    assert c["phase"] == "original" and rep["search"]["reproduce"]["passes"] == []
    assert _accuracy(task[4] / "zero", task[3]) == 1.0


def test_loose_budget_compresses_further_and_holds_on_held_out_rows(task):
    tight = _search(task, "tight", 3.0)
    loose = _search(task, "loose", 25.0)
    t, lo = tight["search"]["chosen"], loose["search"]["chosen"]
    assert lo["objective"] < tight["search"]["base"]["macs_effective"]
    assert lo["objective"] <= t["objective"]
    for rep, name in ((tight, "tight"), (loose, "loose")):
        c, budget = rep["search"]["chosen"], rep["search"]["max_drop"]
        assert c["bound"] <= budget
        drop = 100 * (1.0 - _accuracy(task[4] / name, task[3]))
        assert drop <= budget, f"{name}: {drop:.2f} points on held-out rows > {budget}"
    # search.json: every configuration, a non-dominated frontier, the settings that reproduce
    js = json.loads((task[4] / "loose" / "search.json").read_text())
    assert len(js["evaluated"]) >= 3 and "confidence" in js["margin"]
    fr = js["frontier"]
    for a in fr:
        assert not any(b["objective"] <= a["objective"] and b["drop"] <= a["drop"] and
                       (b["objective"], b["drop"]) != (a["objective"], a["drop"])
                       for b in js["evaluated"] if b["error"] is None)
    rep = json.loads((task[4] / "loose" / "report.json").read_text())
    assert rep["search"]["reproduce"] == js["reproduce"]
    sets = {s.split("=")[0] for s in js["reproduce"]["sets"]}
    assert all(s.split(".")[0] in js["reproduce"]["passes"] for s in sets)


def test_no_configuration_is_evaluated_twice_without_labels(task):
    """Scored by agreement (no labels): the cache still keys on the levels."""
    src, calib, val, _, tmp = task
    opts = CompileOptions(passes=["prune", "lowrank"], calib=calib, build=False, progress=False)
    run_search(src, tmp / "agree", opts, {"x": val["x"]}, 2.0, "macs", minutes=1.0,
               search_passes=["prune", "lowrank"])
    js = json.loads((tmp / "agree" / "search.json").read_text())
    assert js["metric"].startswith("top-1 disagreement")
    seen = [tuple(sorted(c["levels"].items())) for c in js["evaluated"]]
    assert len(seen) == len(set(seen)) and len(seen) > 2


def test_quantize_levels_keep_the_most_sensitive_layers_float(task):
    """quantize's ladder: the worst layer (by the pass's per-layer sensitivity) in float, then
    every layer int8; the chosen exclusion is recorded so --set reproduces it."""
    from edgec.driver.pipeline import NORMALIZE, Pipeline
    from edgec.driver.search import Evaluator

    src, calib, val, _, tmp = task
    model = Pipeline(NORMALIZE).run(onnx.load(src)).model
    ev = Evaluator(model, calib, {"x": val["x"]}, val["labels"], "macs", ["quantize"], 0.95)
    ranked = ev.quantize_ranking()
    assert sorted(r["node"] for r in ranked) == ["conv", "fc1", "fc2"]
    errs = [r["output_error"] for r in ranked]
    assert errs == sorted(errs, reverse=True) and errs[0] > 0
    assert ev.ladder("quantize") == [{"exclude": ranked[0]["node"]}, {}]
    c = ev.evaluate({"quantize": 0}, "test")
    assert c.error is None and c.settings == {"quantize": {"exclude": ranked[0]["node"]}}
    opts = CompileOptions(passes=["quantize"], calib=calib, build=False, progress=False)
    rep = run_search(src, tmp / "qx", opts, val, 100.0, "size", minutes=1.0,
                     search_passes=["quantize"])
    js = json.loads((tmp / "qx" / "search.json").read_text())
    assert [r["node"] for r in js["sensitivity"]["quantize_layers"]] == \
        [r["node"] for r in ranked]
    assert [c["levels"]["quantize"] for c in js["evaluated"][1:]] == [0, 1]
    # under a loose budget the smaller of the two (a tiny layer in int8 can be larger than in
    # float: its Q/DQ nodes and scales), with its exclusion in the reproducing settings
    ch = rep["search"]["chosen"]
    assert ch["size"] == min(c["size"] for c in js["evaluated"][1:])
    want = [f"quantize.exclude={ranked[0]['node']}"] if ch["levels"]["quantize"] == 0 else []
    assert rep["search"]["reproduce"]["sets"] == want


def test_reproduce_settings_give_the_same_model(task):
    from conftest import compile_to

    src, calib, _, _, tmp = task
    rep = json.loads((tmp / "loose" / "report.json").read_text())["search"]["reproduce"]
    if not rep["passes"]:
        pytest.skip("nothing compressed")
    compile_to(src, tmp / "again", passes=rep["passes"], sets=rep["sets"], calib=calib,
               build=False, progress=False)
    a = onnx.load(tmp / "loose" / "model.onnx")
    b = onnx.load(tmp / "again" / "model.onnx")
    x = np.random.default_rng(5).standard_normal((B, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_run(a, {"x": x})[0], ort_run(b, {"x": x})[0], atol=1e-5)


def test_frontier_is_non_dominated():
    from edgec.driver.search import Candidate

    def c(o, d):
        return Candidate({}, {}, o, d, d, None, 1.0, 0, 0, 0, 0.0, "x")

    cands = [c(10, 0), c(5, 1), c(6, 2), c(3, 4), c(5, 0.5), c(2, 9), c(2, 8)]
    fr = frontier(cands)
    assert [(x.objective, x.drop) for x in fr] == [(2, 8), (3, 4), (5, 0.5), (10, 0)]


def test_bounds():
    ok = np.ones(1000, bool)
    drop, bound = upper_bound_drop(ok, ok, 1.28)
    assert drop == 0 and 0 < bound < 0.2
    new = ok.copy()
    new[:20] = False
    drop, bound = upper_bound_drop(ok, new, 1.28)
    assert drop == pytest.approx(2.0) and bound > 2.0
    assert wilson_upper(0, 100, 1.28) > 0 and wilson_upper(5, 100, 1.28) > 5


def test_bad_val_is_refused_before_searching(task, tmp_path):
    src, calib, val, _, _ = task
    opts = CompileOptions(passes=["prune"], calib=calib, build=False, progress=False)
    with pytest.raises(EdgecError, match="labels"):
        run_search(src, tmp_path / "a", opts, {"x": val["x"], "labels": val["labels"][:5]}, 1.0)
    with pytest.raises(EdgecError, match="--val"):
        run_search(src, tmp_path / "b", opts, {"y": val["x"]}, 1.0)
    with pytest.raises(EdgecError, match="latency.*--no-build"):
        run_search(src, tmp_path / "c", opts, val, 1.0, objective="latency")
    bopts = CompileOptions(target="rpi4", passes=["prune"], calib=calib, progress=False)
    with pytest.raises(EdgecError, match="rpi4 does not run on this machine.*--rpc"):
        run_search(src, tmp_path / "c", bopts, val, 1.0, objective="latency")
    with pytest.raises(EdgecError, match="--rpc.*--objective latency"):
        run_search(src, tmp_path / "c", opts, val, 1.0, board={"rpc": "h:1", "key": "k"})
    with pytest.raises(EdgecError, match="same rows"):
        run_search(src, tmp_path / "d", opts, calib, 1.0)
    assert not any((tmp_path / n).exists() for n in "abcd")
    np.savez(tmp_path / "val.npz", x=val["x"][:, :, :4])
    np.savez(tmp_path / "calib.npz", **calib)
    r = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile", str(src),
                        "--calib", str(tmp_path / "calib.npz"), "--val",
                        str(tmp_path / "val.npz"), "--max-drop", "1", "--no-build", "-o",
                        str(tmp_path / "e")], capture_output=True, text=True)
    assert r.returncode == 2 and "--val" in r.stderr and len(r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile", str(src),
                        "--val", str(tmp_path / "val.npz"), "--no-build", "-o",
                        str(tmp_path / "f")], capture_output=True, text=True)
    assert r.returncode == 2 and "--max-drop" in r.stderr
    r = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile", str(src),
                        "--rpc", "127.0.0.1:9190", "--key", "rpi4", "--no-build", "-o",
                        str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 2 and "--rpc belongs to the search" in r.stderr
    assert not any((tmp_path / n).exists() for n in "efg")


@pytest.mark.slow  # 80 s: compiles and times every candidate (CI runs -m slow too)
def test_latency_objective_compiles_and_times_what_may_be_chosen(task):
    """``--objective latency``: the original and every candidate within the budget are built
    and timed (the others never are); the chosen one is the fastest measured within budget."""
    src, calib, val, held, tmp = task
    passes = ["lowrank", "quantize"]
    opts = CompileOptions(passes=passes, calib=calib, progress=False)
    rep = run_search(src, tmp / "lat", opts, val, 3.0, "latency", minutes=3.0,
                     search_passes=passes)
    js = json.loads((tmp / "lat" / "search.json").read_text())
    assert js["objective"] == "latency" and js["base"]["latency_ms"] > 0
    timed = [c for c in js["evaluated"] if c["latency_ms"] is not None]
    within = [c for c in js["evaluated"] if c["error"] is None and c["bound"] <= 3.0]
    assert timed and all(c["bound"] <= 3.0 for c in timed)
    assert len(timed) == len(within) and js["timed"]["builds"] == len(timed)  # the original
    # is the first entry of "evaluated" and was timed as well (the ratio's base)
    assert js["evaluated"][0]["phase"] == "original"
    assert all(c["objective"] == c["latency_ms"] for c in timed)
    assert all(c["objective"] is None for c in js["evaluated"] if c not in timed)
    ch = js["chosen"]
    assert ch["latency_ms"] == min(c["latency_ms"] for c in timed)
    assert all(c["latency_ms"] is not None for c in js["frontier"])
    assert rep["search"]["timed"]["where"] == "this machine" and "kernels" in rep
    assert (tmp / "lat" / "plots" / "tradeoff.png").is_file()
    assert _accuracy(tmp / "lat", held) >= 0.95


def test_lowrank_without_settings_or_data_refuses():
    from edgec.passes import PassContext, make_config, run_pass

    with pytest.raises(EdgecError, match="calib"):
        run_pass("lowrank", _model(), make_config("lowrank"), PassContext())


def test_compressing_compile_with_calib_reports_an_estimated_drop(task):
    from conftest import compile_to

    src, calib, _, _, tmp = task
    rep = compile_to(src, tmp / "est", passes=["prune"], calib=calib, build=False,
                     progress=False)
    est = rep["estimate"]
    assert est["rows"] == 40 and est["held_out"] and est["default_settings"] == ["prune"]
    assert 0 <= est["disagreement"] <= est["upper_90"]
    rep = compile_to(src, tmp / "est2", passes=[], calib=calib, build=False, progress=False)
    assert "estimate" not in rep
