"""The sparse pass: exact identity at density 1, masks at the requested density (per layer and
for one model budget), aligned output-channel blocks, OBS against magnitude on correlated
inputs, reasons for what stays dense, messy weights, config errors through the CLI, and
composition with lowrank and quantize."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import assert_compile_refuses, compile_to, make_model, ort_run
from edgec.passes import PassContext, make_config, run_pass
from edgec.core.errors import EdgecError

F = np.float32


def sparse(model, calib=None, **sets):
    cfg = make_config("sparse", {k: str(v) for k, v in sets.items()})
    return run_pass("sparse", model, cfg, PassContext(calib=calib))


def weights(m) -> dict[str, np.ndarray]:
    """Node name -> its weight (input 1) as stored."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n.name: inits[n.input[1]] for n in m.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def matrix(node_op: str, W: np.ndarray, trans_b: int = 1) -> np.ndarray:
    """[out, in] view of a stored weight."""
    if node_op == "Conv":
        return W.reshape(W.shape[0], -1)
    if node_op == "Gemm" and trans_b:
        return W
    return W.T


def layered(rng, k: int = 5, out_ch: int = 30, batch: int = 4):
    """x[4,6,10,10] -> Conv kxk (6->out_ch, pads) -> Relu -> Conv 3x3 (out_ch->16) -> Relu ->
    Flatten -> Gemm transB=1 (1600->40) -> Relu -> Gemm transB=0 (40->36) -> MatMul (36->34).
    ``out_ch`` and 34 are not multiples of 4 (a partial last block)."""
    p = k // 2
    inits = {
        "Wa": rng.standard_normal((out_ch, 6, k, k)).astype(F) * 0.2,
        "ba": rng.standard_normal(out_ch).astype(F) * 0.1,
        "Wb": rng.standard_normal((16, out_ch, 3, 3)).astype(F) * 0.1,
        "Wc": rng.standard_normal((40, 1600)).astype(F) * 0.03,
        "bc": rng.standard_normal(40).astype(F) * 0.1,
        "Wd": rng.standard_normal((40, 36)).astype(F) * 0.2,
        "Wm": rng.standard_normal((36, 34)).astype(F) * 0.2,
    }
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "ba"], ["a"], name="conv_a", pads=[p] * 4),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "Wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
        helper.make_node("Flatten", ["br"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wc", "bc"], ["c"], name="gemm_t", transB=1),
        helper.make_node("Relu", ["c"], ["cr"], name="relu_c"),
        helper.make_node("Gemm", ["cr", "Wd"], ["d"], name="gemm_n", transB=0),
        helper.make_node("MatMul", ["d", "Wm"], ["y"], name="matmul"),
    ]
    return make_model(nodes, [("x", [batch, 6, 10, 10])], [("y", [batch, 34])], inits)


LAYERS = {"conv_a": "Conv", "conv_b": "Conv", "gemm_t": "Gemm", "gemm_n": "Gemm",
          "matmul": "MatMul"}
TRANS_B = {"gemm_t": 1, "gemm_n": 0}


def _calib(rng, n=64):
    return {"x": rng.standard_normal((n, 6, 10, 10)).astype(F)}


def test_density_one_is_exactly_the_identity():
    rng = np.random.default_rng(0)
    m = layered(rng)
    for sets in ({"density": 1.0}, {"model_density": 1.0}):
        for calib in (None, _calib(rng)):
            out, rep = sparse(m, calib, min_weights=0, **sets)
            assert not rep.modified and not rep.rewritten
            assert all(np.array_equal(weights(out)[k], v) for k, v in weights(m).items())
            assert all(s["reason"] == "density 1: every weight kept" for s in rep.skipped)


def test_magnitude_masks_hit_the_density_and_run_in_onnxruntime():
    rng = np.random.default_rng(1)
    m = layered(rng, k=5)
    out, rep = sparse(m, density=0.3, min_weights=0)
    assert rep.details["chosen"] == "density=0.3 per layer" and rep.details["method"] == \
        "magnitude"
    before, after = weights(m), weights(out)
    assert {r["node"] for r in rep.rewritten} == set(LAYERS)
    for name, op in LAYERS.items():
        W, Wp = before[name], after[name]
        assert Wp.shape == W.shape and Wp.dtype == W.dtype
        keep = Wp != 0
        assert abs(keep.sum() - round(0.3 * W.size)) <= 1, name
        np.testing.assert_array_equal(Wp[keep], W[keep])         # kept weights untouched
        assert np.abs(W[keep]).min() >= np.abs(W[~keep]).max()   # the largest magnitudes
        entry = next(r for r in rep.rewritten if r["node"] == name)
        assert entry["nnz"] == keep.sum() and entry["pattern"] == "unstructured"
        assert entry["density_requested"] == 0.3
        assert abs(entry["density_achieved"] - 0.3) < 1e-3
        assert 0 < entry["weight_error"] < 1
    # the rewritten model == the original with the masks applied, in onnxruntime
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    masked = {n.input[1]: after[n.name] for n in m.graph.node if n.name in LAYERS}
    for t in ref.graph.initializer:
        if t.name in masked:
            t.CopyFrom(numpy_helper.from_array(masked[t.name], t.name))
    x = rng.standard_normal((4, 6, 10, 10)).astype(F)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(ref, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    assert not any(t.data_location for t in out.graph.initializer)
    assert len(out.graph.sparse_initializer) == 0


def test_default_is_one_half_budget_and_min_weights_keeps_small_layers_dense():
    rng = np.random.default_rng(2)
    m = layered(rng, k=3)
    out, rep = sparse(m)
    assert rep.details["chosen"].startswith("model_density=0.5 ") and \
        "default" in rep.details["chosen"]
    # conv_a (30*6*9 = 1620), Wd (1440), Wm (1224) are above 1024; conv_b 4320; gemm_t 64000
    assert not rep.skipped or all("density 1" in s["reason"] for s in rep.skipped)
    assert abs(rep.details["eligible_density"] - 0.5) < 0.002
    out, rep = sparse(m, min_weights=1500, density=0.5)
    assert set(r["node"] for r in rep.skipped) == {"gemm_n", "matmul"}
    assert all("min_weights" in s["reason"] for s in rep.skipped)


@pytest.mark.parametrize("calib", [False, True])
def test_model_density_meets_the_total(calib):
    rng = np.random.default_rng(3)
    m = layered(rng, k=3)
    out, rep = sparse(m, _calib(rng) if calib else None, model_density=0.2, min_weights=0)
    before, after = weights(m), weights(out)
    total = sum(before[k].size for k in LAYERS)
    kept = sum(np.count_nonzero(after[k]) for k in LAYERS)
    assert abs(kept / total - 0.2) < 0.002, kept / total
    dens = rep.details["allocation"]["densities"]
    assert len(set(round(v, 3) for v in dens.values())) > 1   # not one density everywhere
    assert rep.details["allocation"]["error_of"] == ("outputs" if calib else "weights")
    assert abs(rep.details["eligible_density"] - 0.2) < 0.002


@pytest.mark.parametrize("calib", [False, True])
def test_block_pattern_shares_one_mask_per_aligned_output_block(calib):
    rng = np.random.default_rng(4)
    m = layered(rng, k=3, out_ch=30)
    B = 4
    out, rep = sparse(m, _calib(rng) if calib else None, pattern="block", block=B,
                      density=0.25, min_weights=0)
    after = weights(out)
    for name, op in LAYERS.items():
        M = matrix(op, after[name], TRANS_B.get(name, 1)) != 0
        rows = M.shape[0]
        for s in range(0, rows, B):          # blocks at 0, B, 2B, ...; the last one shorter
            blk = M[s:min(s + B, rows)]
            assert (blk == blk[0]).all(), (name, s)
        assert abs(M.mean() - 0.25) < 0.02, (name, M.mean())
        entry = next(r for r in rep.rewritten if r["node"] == name)
        assert entry["pattern"] == "block" and entry["block"] == B
    # conv_a has 30 outputs: blocks [0,4) ... [24,28) and [28,30)
    Ma = after["conv_a"].reshape(30, -1) != 0
    assert (Ma[28] == Ma[29]).all()


def test_data_aware_beats_magnitude_on_correlated_inputs():
    """Inputs with strongly correlated, unequally scaled features: OBS (with reconstruction)
    leaves a far smaller output error on held-out rows than magnitude at the same density."""
    rng = np.random.default_rng(5)
    K, N = 64, 48
    mix = rng.standard_normal((16, K)) * rng.uniform(0.1, 3.0, K)[None, :]

    def sample(n):
        return (rng.standard_normal((n, 16)) @ mix + 0.1 * rng.standard_normal((n, K))
                ).astype(F)

    W = rng.standard_normal((N, K)).astype(F)
    b = rng.standard_normal(N).astype(F)
    m = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                   [("x", [8, K])], [("y", [8, N])], {"W": W, "b": b})
    xt = sample(800)
    yt = xt @ W.T + b
    err = {}
    for calib in (None, {"x": sample(2000)}):
        out, rep = sparse(m, calib, density=0.25, min_weights=0)
        Wp = weights(out)["fc"]
        assert abs(np.count_nonzero(Wp) / Wp.size - 0.25) < 1e-3
        got = np.concatenate([ort_run(out, {"x": xt[i:i + 8]})[0]
                              for i in range(0, len(xt), 8)])
        err[calib is not None] = np.linalg.norm(got - yt) / np.linalg.norm(yt)
    assert err[True] < 0.6 * err[False], err
    entry = rep.rewritten[0]
    assert entry["method"] == "obs" and "output_error" in entry


def test_data_aware_sequential_layers_report_output_errors():
    rng = np.random.default_rng(6)
    m = layered(rng, k=3)
    out, rep = sparse(m, _calib(rng), density=0.4, min_weights=0)
    assert rep.details["method"] == "obs"
    rows = {r["node"]: r for r in rep.rewritten}
    assert set(rows) == set(LAYERS)
    assert all(0 <= r["output_error"] < 1 for r in rows.values())
    assert rows["conv_b"].get("sequential") and rows["matmul"].get("sequential")
    assert "relu_weighted_output_error" in rows["conv_a"]     # conv_a -> Relu
    x = rng.standard_normal((4, 6, 10, 10)).astype(F)
    y0, y1 = ort_run(m, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert np.isfinite(y1).all() and y1.shape == y0.shape


def test_what_stays_dense_is_reported_with_reasons():
    rng = np.random.default_rng(7)
    inits = {"Wg": rng.standard_normal((32, 8, 3, 3)).astype(F),      # group=4
             "Wx": rng.standard_normal((32, 32, 1, 1)).astype(F),
             "Wsmall": rng.standard_normal((32, 32, 1, 1)).astype(F)}
    nodes = [
        helper.make_node("Conv", ["x", "Wg"], ["g"], name="grouped", group=4, pads=[1] * 4),
        helper.make_node("Conv", ["g", "Wx"], ["h"], name="excluded"),
        helper.make_node("Conv", ["h", "Wsmall"], ["k"], name="kept"),
        helper.make_node("Flatten", ["k"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w_in"], ["y"], name="runtime_weight"),
    ]
    m = make_model(nodes, [("x", [1, 32, 4, 4]), ("w_in", [512, 5])], [("y", [1, 5])], inits)
    out, rep = sparse(m, density=0.5, exclude="excluded")
    why = {s["node"]: s["reason"] for s in rep.skipped}
    assert "group=4" in why["grouped"]
    assert "exclude" in why["excluded"]
    assert "not a constant" in why["runtime_weight"]
    assert [r["node"] for r in rep.rewritten] == ["kept"]
    np.testing.assert_array_equal(weights(out)["excluded"], inits["Wx"])
    out, rep = sparse(m, density=0.5, include="excluded", min_weights=2000)
    why = {s["node"]: s["reason"] for s in rep.skipped}
    assert "include" in why["kept"] and "min_weights" in why["excluded"]


def test_constant_node_and_initializer_listed_as_input():
    """Weights held in a Constant node, and an initializer that is also a graph input (old
    exporters): sparsified, and the result needs no feed but the real input."""
    rng = np.random.default_rng(8)
    W1 = rng.standard_normal((64, 20)).astype(F)
    W2 = rng.standard_normal((32, 20)).astype(F)
    nodes = [helper.make_node("Constant", [], ["W1"], name="c1",
                              value=numpy_helper.from_array(W1)),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Gemm", ["h", "W2"], ["y"], name="gemm", transB=1)]
    m = make_model(nodes, [("x", [2, 64]), ("W2", [32, 20])], [("y", [2, 32])], {"W2": W2})
    out, rep = sparse(m, density=0.25, min_weights=0)
    assert {r["node"] for r in rep.rewritten} == {"mm1", "gemm"}
    assert [i.name for i in out.graph.input] == ["x"]
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    w = weights(out)
    assert abs(np.count_nonzero(w["mm1"]) / w["mm1"].size - 0.25) < 0.01
    x = rng.standard_normal((2, 64)).astype(F)
    want = (x @ w["mm1"]) @ w["gemm"].T
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


def test_bad_options():
    for sets, needle in (({"density": "0"}, "density must be within (0, 1]"),
                         ({"density": "1.5"}, "density must be within (0, 1]"),
                         ({"model_density": "-0.1"}, "model_density must be within"),
                         ({"density": "0.5", "model_density": "0.5"}, "not both"),
                         ({"pattern": "diagonal"}, "not one of"),
                         ({"block": "0"}, "block must be >= 1")):
        with pytest.raises(EdgecError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            make_config("sparse", sets)


def test_bad_options_through_the_cli_are_one_line_exit_2(tmp_path):
    m = layered(np.random.default_rng(9))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    for sets, needle in ((["--set", "sparse.density=0"], "density must be within (0, 1]"),
                         (["--set", "sparse.pattern=diag"], "not one of"),
                         (["--set", "sparse.block=0"], "block must be >= 1")):
        assert_compile_refuses(src, ["--passes", "sparse", *sets], needle, tmp_path / "out")


@pytest.mark.parametrize("passes,sets", [
    (["lowrank", "sparse"], ["lowrank.rank_ratio=0.5", "sparse.density=0.4",
                             "sparse.min_weights=0"]),
    (["sparse", "quantize"], ["sparse.density=0.3", "sparse.pattern=block"]),
])
def test_composes_with_lowrank_and_quantize(tmp_path, passes, sets):
    rng = np.random.default_rng(10)
    m = layered(rng, k=3)
    calib = _calib(rng, 32)
    out = tmp_path / "art"
    rep = compile_to(m, out, passes=passes, sets=sets, calib=calib, build=False,
                     progress=False)
    names = [p["name"] for p in rep["passes"]]
    assert names[-2:] == passes and all(p["modified"] for p in rep["passes"][-2:])
    sp = next(p for p in rep["passes"] if p["name"] == "sparse")
    assert sp["rewritten"] and sp["details"]["method"] == "obs"
    got = onnx.load(out / "model.onnx")
    x = rng.standard_normal((4, 6, 10, 10)).astype(F)
    y0, y1 = ort_run(m, {"x": x})[0], ort_run(got, {"x": x})[0]
    assert y1.shape == y0.shape and np.isfinite(y1).all()
    if passes[0] == "lowrank":   # the factors lowrank wrote are what sparse zeroed
        assert any("lowrank" in r["node"] for r in sp["rewritten"])
        dens = [r["density_achieved"] for r in sp["rewritten"]]
        assert all(abs(d - 0.4) < 0.02 for d in dens), dens
    else:                        # the int8 weights keep the zeros (and the blocks)
        q = [numpy_helper.to_array(t) for t in got.graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
        assert q and all(abs(np.mean(w == 0) - 0.7) < 0.05 for w in q), \
            [np.mean(w == 0) for w in q]
