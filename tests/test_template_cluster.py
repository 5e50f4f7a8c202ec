"""The cluster and template passes: codebook sizes per layer and per channel, exact identity,
the data-aware codebook refit against plain k-means, the 25 binary HLAC masks, the reader
refit, config errors through the CLI, onnxruntime runs and composition with quantize."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import assert_compile_refuses, compile_to, make_model, ort_run
from edgec.passes import PassContext, make_config, run_pass
from edgec.passes._template_bank import hlac_masks

F = np.float32


def run(name, model, calib=None, **sets):
    cfg = make_config(name, {k: str(v) for k, v in sets.items()})
    return run_pass(name, model, cfg, PassContext(calib=calib))


def weights(m) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n.name: inits[n.input[1]] for n in m.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def net(rng, c=3, k=16, batch=4):
    """x[4,c,10,10] -> Conv 3x3 (c->k, pads) -> Relu -> Conv 3x3 (k->12) -> Relu -> Flatten
    -> Gemm transB=1 (1200->20) -> MatMul (20->10)."""
    inits = {"Wa": rng.standard_normal((k, c, 3, 3)).astype(F) * 0.3,
             "ba": rng.standard_normal(k).astype(F) * 0.1,
             "Wb": rng.standard_normal((12, k, 3, 3)).astype(F) * 0.1,
             "Wc": rng.standard_normal((20, 1200)).astype(F) * 0.03,
             "bc": rng.standard_normal(20).astype(F) * 0.1,
             "Wm": rng.standard_normal((20, 10)).astype(F) * 0.2}
    nodes = [helper.make_node("Conv", ["x", "Wa", "ba"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "Wb"], ["b"], name="conv_b", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
             helper.make_node("Flatten", ["br"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wc", "bc"], ["c"], name="gemm", transB=1),
             helper.make_node("MatMul", ["c", "Wm"], ["y"], name="matmul")]
    return make_model(nodes, [("x", [batch, c, 10, 10])], [("y", [batch, 10])], inits)


def calib(rng, n=64, c=3):
    return {"x": rng.standard_normal((n, c, 10, 10)).astype(F)}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- cluster

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_cluster_codebook_size_per_layer_and_channel(bits):
    rng = np.random.default_rng(bits)
    m = net(rng)
    x = rng.standard_normal((4, 3, 10, 10)).astype(F)
    for gran in ("layer", "channel"):
        out, rep = run("cluster", m, bits=bits, granularity=gran)
        assert {r["node"] for r in rep.rewritten} == {"conv_a", "conv_b", "gemm", "matmul"}
        for name, W in weights(out).items():
            if gran == "layer":
                assert len(np.unique(W)) == 2 ** bits, (name, len(np.unique(W)))
            else:
                rows = W.reshape(W.shape[0], -1) if W.ndim == 4 else \
                    (W if name == "gemm" else W.T)
                assert max(len(np.unique(r)) for r in rows) <= 2 ** bits
            assert W.dtype == np.float32
        lay = rep.details["layers"]
        assert all(0 < r["distinct_products"] <= r["multiplies_dense"] for r in lay)
        y = ort_run(out, {"x": x})[0]
        assert np.isfinite(y).all() and y.shape == (4, 10)
    # per layer: the stored values are exactly the codebook (bit-identical float32)
    out, rep = run("cluster", m, bits=bits)
    for r in rep.details["layers"]:
        assert sorted(np.unique(weights(out)[r["node"]]).tolist()) == r["codebook_values"]


def test_cluster_ternary_and_identity():
    rng = np.random.default_rng(5)
    m = net(rng)
    out, _ = run("cluster", m, ternary=True)
    for W in weights(out).values():
        v = np.unique(W)
        assert len(v) == 3 and v[1] == 0 and v[0] == -v[2]
    # weights already holding <= 2^bits values stay exactly as they are
    out2, rep2 = run("cluster", out, bits=2)
    assert not rep2.modified and all(np.array_equal(weights(out2)[k], v)
                                     for k, v in weights(out).items())
    assert all("kept exactly" in s["reason"] for s in rep2.skipped)


def test_cluster_data_aware_refit_beats_plain_kmeans():
    """Inputs with very different scales per column, the weights larger where the inputs
    are small (as trained layers have them): the H-weighted k-means plus the
    least-squares codebook refit give a smaller output error than plain k-means."""
    rng = np.random.default_rng(7)
    n_in, n_out = 64, 32
    s = np.exp(rng.uniform(-2.5, 2.5, n_in)).astype(F)
    W = (rng.standard_normal((n_out, n_in)) / s).astype(F)    # big weights on small inputs
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)],
                   [("x", [8, n_in])], [("y", [8, n_out])], {"W": W})
    mix = np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in))
    cal = {"x": ((rng.standard_normal((512, n_in)) @ mix) * s).astype(F)}
    test = ((rng.standard_normal((256, n_in)) @ mix) * s).astype(F)
    y0 = test @ W.T
    errs = {}
    for label, c, sets in (("plain", None, {}), ("aware", cal, {"refit": "false"}),
                           ("refit", cal, {})):
        out, rep = run("cluster", m, c, bits=2, **sets)
        Wq = weights(out)["fc"]
        assert len(np.unique(Wq)) <= 4
        errs[label] = rel(test @ Wq.T, y0)
    r = rep.details["layers"][0]
    assert r["output_error_refit"] < r["output_error_kmeans"]
    assert errs["refit"] < errs["aware"] < errs["plain"], errs


# ----------------------------------------------------------------------------- template

def test_hlac_masks_are_the_25_binary_masks():
    M = hlac_masks()
    assert M.shape == (25, 3, 3) and set(np.unique(M)) == {0.0, 1.0}
    assert all(M[:, 1, 1] == 1)                              # the reference point
    assert sorted(M.reshape(25, -1).sum(1).astype(int).tolist()) == [1] + [2] * 4 + [3] * 20
    assert len({tuple(x) for x in M.reshape(25, -1)}) == 25


@pytest.mark.parametrize("bank", ["hlac", "lbc"])
def test_template_filters_are_binary_times_one_scale(bank):
    rng = np.random.default_rng(11)
    m = net(rng)
    out, rep = run("template", m, bank=bank, count=6)
    row = rep.details["layers"][0]
    assert row["node"] == "conv_a" and row["filters_replaced"] == 6
    Wn, W0 = weights(out)["conv_a"], weights(m)["conv_a"]
    for r in row["replaced"]:
        f = Wn[r["filter"]]
        assert np.array_equal(np.unique(np.abs(f[f != 0])), [np.float32(abs(r["alpha"]))])
        taps = f / np.float32(r["alpha"])
        assert set(np.unique(taps)) <= {-1.0, 0.0, 1.0}
        if bank == "hlac":   # one mask, the same on every channel that is read
            pat = [tuple(np.abs(taps[c]).reshape(-1)) for c in range(3) if taps[c].any()]
            assert len(set(pat)) == 1 and 1 <= sum(pat[0]) <= 3
    kept = [k for k in range(16) if k not in {r["filter"] for r in row["replaced"]}]
    assert np.array_equal(Wn[kept], W0[kept])
    assert row["trainable_params_before"] == 16 * 27
    assert row["trainable_params_after_without_scales"] == 10 * 27
    assert row["multiplies_template"] == (10 * 27 + 6) * 100
    assert weights(out)["conv_b"] is not None and not rep.details["reconstruction"]
    y = ort_run(out, {"x": rng.standard_normal((4, 3, 10, 10)).astype(F)})[0]
    assert np.isfinite(y).all()


def test_template_reader_refit_reduces_the_error():
    rng = np.random.default_rng(13)
    m = net(rng)
    cal = calib(rng, 96)
    x = rng.standard_normal((4, 3, 10, 10)).astype(F)
    y0 = ort_run(m, {"x": x})[0]
    no, _ = run("template", m, cal, count=10, refit="false")
    yes, rep = run("template", m, cal, count=10)
    rec = rep.details["reconstruction"]
    assert [r["node"] for r in rec] == ["conv_b"] and rec[0]["applied"]
    assert rec[0]["held_out_error_after"] < rec[0]["held_out_error_before"]
    e_no, e_yes = rel(ort_run(no, {"x": x})[0], y0), rel(ort_run(yes, {"x": x})[0], y0)
    assert e_yes < e_no, (e_yes, e_no)
    # the template layer itself is untouched by the refit
    assert np.array_equal(weights(yes)["conv_a"], weights(no)["conv_a"])


def test_template_max_error_picks_the_count():
    rng = np.random.default_rng(17)
    m = net(rng, c=1)
    _, rep0 = run("template", m, max_error=0.0)
    assert not rep0.modified and "max_error" in rep0.skipped[-1]["reason"]
    _, rep1 = run("template", m, max_error=2.0)
    assert rep1.details["layers"][0]["filters_replaced"] == 16


# ----------------------------------------------------------------------------- CLI, compose

def test_bad_options_through_the_cli_are_one_line_exit_2(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(net(np.random.default_rng(9)), src)
    for passes, sets, needle in (("cluster", "cluster.bits=0", "bits must be within 1..4"),
                                 ("cluster", "cluster.bits=5", "bits must be within 1..4"),
                                 ("cluster", "cluster.granularity=row", "not one of"),
                                 ("template", "template.bank=dct", "not one of"),
                                 ("template", "template.sparsity=1", "sparsity must be")):
        assert_compile_refuses(src, ["--passes", passes, "--set", sets], needle,
                               tmp_path / "out")


@pytest.mark.parametrize("passes,sets", [
    (["cluster", "quantize"], ["cluster.bits=3"]),
    (["template", "cluster", "quantize"], ["template.count=8", "cluster.bits=4"]),
])
def test_composes_with_quantize(tmp_path, passes, sets):
    rng = np.random.default_rng(21)
    m = net(rng)
    out = tmp_path / "art"
    rep = compile_to(m, out, passes=passes, sets=sets, calib=calib(rng, 32), build=False,
                     progress=False)
    names = [p["name"] for p in rep["passes"]]
    assert names[-len(passes):] == passes and all(p["modified"] for p in
                                                  rep["passes"][-len(passes):])
    got = onnx.load(out / "model.onnx")
    x = rng.standard_normal((4, 3, 10, 10)).astype(F)
    y0, y1 = ort_run(m, {"x": x})[0], ort_run(got, {"x": x})[0]
    assert y1.shape == y0.shape and np.isfinite(y1).all()


def test_cluster_sequential_with_bias_refit():
    """Layer by layer on the clustered model's inputs, the bias refitted (the accuracy gain
    shows on the trained CNN, benchmarks/cluster_table.py; a random net has none to show)."""
    rng = np.random.default_rng(23)
    m = net(rng)
    seq, rep = run("cluster", m, calib(rng, 96), bits=2)
    lay = {r["node"]: r for r in rep.details["layers"]}
    assert not lay["conv_a"]["sequential"] and lay["conv_b"]["sequential"]
    assert lay["gemm"]["bias_refit"] is True and "MatMul" in lay["matmul"]["bias_refit"]
    assert all(r["output_error"] <= r["output_error_kmeans"] for r in lay.values())
    for W in weights(seq).values():
        assert len(np.unique(W)) <= 4
    b0 = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}["bc"]
    b1 = numpy_helper.to_array(next(t for t in seq.graph.initializer
                                    if t.name == next(n for n in seq.graph.node
                                                      if n.name == "gemm").input[2]))
    assert b1.shape == b0.shape and not np.array_equal(b1, b0)
    y = ort_run(seq, {"x": rng.standard_normal((4, 3, 10, 10)).astype(F)})[0]
    assert np.isfinite(y).all()
