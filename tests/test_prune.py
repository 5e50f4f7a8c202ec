"""The prune pass: exact removal of dead channels through every mapping, dependency groups,
reasons for what is left alone, sizing rules, reconstruction, composition, compilation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import compile_to, make_model, ort_run
from edgec.core.errors import EdgecError
from edgec.core.importer import infer_shapes
from edgec.passes import PassContext, make_config, run_pass


def prune(model, calib=None, **sets):
    cfg = make_config("prune", {k: str(v) for k, v in sets.items()})
    return run_pass("prune", model, cfg, PassContext(calib=calib))


def zoo_of_mappings(rng, dead_ab=(3, 7), dead_c=(2,)):
    """x -> A(8->16) -> relu -> B(16->16) + relu(A) [residual: A,B one group] -> depthwise ->
    BN -> relu -> Mul(per-channel) -> concat with C(x) (8 ch) -> D(24->12) -> flatten -> Gemm.
    Channels ``dead_ab`` of A and B and ``dead_c`` of C are all-zero (weights and bias) and
    stay zero through the depthwise conv, BN and Mul."""
    f = np.float32
    A = rng.standard_normal((16, 8, 3, 3)).astype(f) * 0.3
    B = rng.standard_normal((16, 16, 3, 3)).astype(f) * 0.2
    bA, bB = rng.standard_normal(16).astype(f), rng.standard_normal(16).astype(f)
    DW = rng.standard_normal((16, 1, 3, 3)).astype(f)
    bDW = rng.standard_normal(16).astype(f)
    g, beta = (rng.random(16) + 0.5).astype(f), rng.standard_normal(16).astype(f)
    mean, var = rng.standard_normal(16).astype(f) * 0.1, (rng.random(16) + 0.5).astype(f)
    S = rng.standard_normal((1, 16, 1, 1)).astype(f)
    C = rng.standard_normal((8, 8, 1, 1)).astype(f)
    bC = rng.standard_normal(8).astype(f)
    D = rng.standard_normal((12, 24, 3, 3)).astype(f) * 0.1
    G = rng.standard_normal((12 * 6 * 6, 10)).astype(f) * 0.05
    for k in dead_ab:
        A[k] = 0
        B[k] = 0
        bA[k] = bB[k] = bDW[k] = beta[k] = mean[k] = 0
    for k in dead_c:
        C[k] = 0
        bC[k] = 0
    inits = dict(A=A, B=B, bA=bA, bB=bB, DW=DW, bDW=bDW, g=g, beta=beta, mean=mean, var=var,
                 S=S, C=C, bC=bC, D=D, G=G)
    nodes = [
        helper.make_node("Conv", ["x", "A", "bA"], ["a"], pads=[1] * 4, name="A"),
        helper.make_node("Relu", ["a"], ["ar"], name="ra"),
        helper.make_node("Conv", ["ar", "B", "bB"], ["b"], pads=[1] * 4, name="B"),
        helper.make_node("Add", ["b", "ar"], ["s"], name="res"),
        helper.make_node("Conv", ["s", "DW", "bDW"], ["d"], pads=[1] * 4, group=16, name="dw"),
        helper.make_node("BatchNormalization", ["d", "g", "beta", "mean", "var"], ["e"],
                         name="bn"),
        helper.make_node("Relu", ["e"], ["er"], name="re"),
        helper.make_node("Mul", ["er", "S"], ["m"], name="scale"),
        helper.make_node("Conv", ["x", "C", "bC"], ["c"], name="C"),
        helper.make_node("Concat", ["m", "c"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "D"], ["dd"], pads=[0] * 4, strides=[1, 1], name="D"),
        helper.make_node("Flatten", ["dd"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "G"], ["y"], name="fc"),
    ]
    return infer_shapes(make_model(nodes, [("x", [2, 8, 8, 8])], [("y", [2, 10])], inits))


def test_dead_channels_prune_exactly_through_every_mapping():
    rng = np.random.default_rng(0)
    m = zoo_of_mappings(rng)
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    out, rep = prune(m, ratio=2 / 16 + 1e-9, min_channels=1, reconstruct=False,
                     include="A,C")
    groups = {tuple(g["producers"]): g for g in rep.details["groups"]}
    assert groups[("A", "B")]["kept"] == 14  # residual partners pruned together
    assert groups[("C",)]["kept"] == 7
    assert groups[("D",)]["skipped"] == "not in prune.include"
    _, rep_d = prune(m, ratio=0.25, min_channels=1)
    assert {tuple(g["producers"]): g for g in rep_d.details["groups"]}[("D",)]["kept"] == 9
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    node = {n.name: n for n in out.graph.node}
    assert w[node["A"].input[1]].shape == (14, 8, 3, 3)
    assert w[node["B"].input[1]].shape == (14, 14, 3, 3)
    assert w[node["dw"].input[1]].shape == (14, 1, 3, 3)
    assert [a.i for a in node["dw"].attribute if a.name == "group"] == [14]
    assert w[node["bn"].input[1]].shape == (14,)
    assert w[node["scale"].input[1]].shape == (1, 14, 1, 1)
    assert w[node["C"].input[1]].shape == (7, 8, 1, 1)
    assert w[node["D"].input[1]].shape[1] == 21  # concat offsets: 14 + 7
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0],
                               atol=1e-5, rtol=0)
    from edgec.core.graph import provenance

    keys = [p.key for p in node["B"].metadata_props]
    assert provenance(node["B"])["edgec.pass"] == "prune" and len(keys) == len(set(keys))


def test_flatten_gemm_index_mapping():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    W[[1, 4]] *= 1e-3  # smallest L1: pruned
    G = rng.standard_normal((6 * 4 * 5, 7)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "G"], ["y"], name="fc")]
    m = infer_shapes(make_model(nodes, [("x", [1, 3, 6, 7])], [("y", [1, 7])],
                                {"W": W, "G": G}))
    out, rep = prune(m, ratio=2 / 6, min_channels=1)
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    fc = next(n for n in out.graph.node if n.name == "fc")
    kept = [0, 2, 3, 5]
    rows = np.concatenate([np.arange(c * 20, (c + 1) * 20) for c in kept])
    np.testing.assert_array_equal(w[fc.input[1]], G[rows])
    # the same mapping with transB and a Reshape instead of Flatten
    nodes[1] = helper.make_node("Reshape", ["c", "shape"], ["f"], name="flat")
    nodes[2] = helper.make_node("Gemm", ["f", "GT"], ["y"], name="fc", transB=1)
    m2 = infer_shapes(make_model(nodes, [("x", [1, 3, 6, 7])], [("y", [1, 7])],
                                 {"W": W, "GT": G.T.copy(), "shape": np.array([1, 120])}))
    out2, _ = prune(m2, ratio=2 / 6, min_channels=1)
    w2 = {t.name: numpy_helper.to_array(t) for t in out2.graph.initializer}
    fc2 = next(n for n in out2.graph.node if n.name == "fc")
    np.testing.assert_array_equal(w2[fc2.input[1]], G.T[:, rows])


def test_ratio_zero_is_identity():
    m = zoo_of_mappings(np.random.default_rng(2))
    out, rep = prune(m, ratio=0.0, min_channels=1)
    assert not rep.modified and out.graph == m.graph
    assert all("keeps all" in s["reason"] for s in rep.skipped)


def test_groups_stay_shape_consistent_at_half():
    rng = np.random.default_rng(3)
    m = zoo_of_mappings(rng, dead_ab=(), dead_c=())
    out, rep = prune(m, ratio=0.5, min_channels=1)  # onnx checker runs inside run_pass
    onnx.checker.check_model(out, full_check=True)
    y = ort_run(out, {"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)})[0]
    assert y.shape == (2, 10)
    assert rep.after["macs"] < 0.5 * rep.before["macs"]


def test_what_cannot_be_pruned_is_left_alone_with_reasons():
    rng = np.random.default_rng(4)
    f = np.float32
    inits = {"W1": rng.standard_normal((8, 4, 3, 3)).astype(f),
             "W2": rng.standard_normal((8, 4, 3, 3)).astype(f),       # grouped reader (g=2)
             "W3": rng.standard_normal((8, 4, 1, 1)).astype(f),
             "W4": rng.standard_normal((8, 8, 1, 1)).astype(f)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Conv", ["a", "W2"], ["b"], pads=[1] * 4, group=2, name="grp"),
             helper.make_node("Conv", ["x", "W3"], ["c"], name="c3"),
             helper.make_node("Softmax", ["c"], ["d"], axis=1, name="sm"),
             helper.make_node("Conv", ["d", "W4"], ["e"], name="c4"),
             helper.make_node("Add", ["b", "e"], ["y"], name="add"),
             helper.make_node("Conv", ["x", "W3"], ["y2"], name="c5")]
    m = infer_shapes(make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6]),
                                                               ("y2", [1, 8, 6, 6])], inits))
    out, rep = prune(m, ratio=0.5)
    assert not rep.modified
    reasons = {s["node"]: s["reason"] for s in rep.skipped}
    assert "grouped conv grp (group=2)" in reasons["c1"]
    assert "Softmax" in reasons["c3"]
    assert "combines it with a computed tensor" in reasons["c4"]
    assert "graph output y2" in reasons["c5"]


def test_pca_counts_components():
    """16 filters spanned by 3: the output has 3 principal components."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 2, 3, 3))
    W = np.einsum("kb,bchw->kchw", rng.standard_normal((16, 3)), base).astype(np.float32)
    W2 = rng.standard_normal((5, 16, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], pads=[1] * 4, name="c1"),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="c2")]
    m = infer_shapes(make_model(nodes, [("x", [1, 2, 8, 8])], [("y", [1, 5, 8, 8])],
                                {"W": W, "W2": W2}))
    calib = {"x": rng.standard_normal((64, 2, 8, 8)).astype(np.float32)}
    out, rep = prune(m, calib, alpha=0.99, min_channels=1)
    g = rep.details["groups"][0]
    assert g["pca_components"] == 3 and g["kept"] == 3
    # three of the 16 channels span the others: reconstruction recovers the output exactly
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    ref, got = ort_run(m, {"x": x})[0], ort_run(out, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2  # float32 activations
    _, rep = prune(m, calib, alpha=0.99, min_channels=4)
    assert rep.details["groups"][0]["kept"] == 4


def test_sigma_rule():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    W[[0, 5]] *= 0.01
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "W2"], ["y"], name="c2")]
    m = infer_shapes(make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 4, 4])],
                                {"W": W, "W2": rng.standard_normal((4, 8, 1, 1))
                                 .astype(np.float32)}))
    _, rep = prune(m, sigma_k=0.2, min_channels=1)
    assert rep.details["groups"][0]["kept"] == 6


def test_reconstruction_lowers_error_on_held_data():
    rng = np.random.default_rng(7)
    m = zoo_of_mappings(rng, dead_ab=(), dead_c=())
    calib = {"x": rng.standard_normal((96, 8, 8, 8)).astype(np.float32)}
    held = rng.standard_normal((32, 8, 8, 8)).astype(np.float32)
    ref = np.concatenate([ort_run(m, {"x": held[i:i + 2]})[0] for i in range(0, 32, 2)])
    err = {}
    for rec in (False, True):
        out, rep = prune(m, calib, ratio=0.4, min_channels=1, reconstruct=rec)
        got = np.concatenate([ort_run(out, {"x": held[i:i + 2]})[0] for i in range(0, 32, 2)])
        err[rec] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if rec:
            entries = rep.details["reconstruction"]
            assert {e["node"] for e in entries} >= {"B", "D", "fc"}
            assert all(e["held_out_error_after"] < e["held_out_error_before"]
                       for e in entries if e["applied"])
    assert err[True] < 0.8 * err[False], err


def test_bad_options_and_missing_calib():
    m = zoo_of_mappings(np.random.default_rng(8))
    with pytest.raises(EdgecError, match="needs calibration data"):
        prune(m)  # alpha (the default) without --calib
    with pytest.raises(EdgecError, match="within"):
        make_config("prune", {"ratio": "1.2"})
    with pytest.raises(EdgecError, match="not one of"):
        make_config("prune", {"rank_by": "random"})


def test_tiny_resnet_prunes_lowranks_quantizes_and_compiles(tmp_path):
    """Residual groups on a real-shaped graph, composed with lowrank and quantize in one
    ``--passes prune,lowrank,quantize`` run, through TVM."""
    from edgec.models import zoo
    from edgec.runtime import Session

    src = zoo.export("tiny_resnet", tmp_path / "r.onnx", seed=0, batch=1)
    shape = zoo.input_shape("tiny_resnet", 1)
    rng = np.random.default_rng(9)
    name = onnx.load(src).graph.input[0].name
    np.savez(tmp_path / "calib.npz", **{name: rng.standard_normal([32] + shape[1:])
                                        .astype(np.float32)})
    from edgec.runtime import load_npz

    out = tmp_path / "art"
    rep = compile_to(src, out, passes=["prune", "lowrank", "quantize"], sets=[
        "prune.ratio=0.25", "lowrank.rank_ratio=0.5"], calib=load_npz(tmp_path / "calib.npz"))
    assert [p["name"] for p in rep["passes"]][-3:] == ["prune", "lowrank", "quantize"]
    assert all(p["modified"] for p in rep["passes"][-3:])
    pr = next(p for p in rep["passes"] if p["name"] == "prune")
    assert pr["modified"] and any(len(g["producers"]) > 1 for g in pr["details"]["groups"]
                                  if "kept" in g), "a residual group was pruned"
    assert rep["after"]["macs"] < rep["before"]["macs"]
    x = rng.standard_normal(shape).astype(np.float32)
    want = ort_run(onnx.load(out / "model.onnx"), {name: x})[0]
    got = Session(out).run(None, {name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_trained_fashion_model_prunes_40pct_with_reconstruction():
    from pathlib import Path

    from edgec.core.importer import load_model, normalize
    from edgec.models import fashion_mnist
    from edgec.driver.pipeline import NORMALIZE, Pipeline
    from edgec.runtime import OrtSession

    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist is not installed")
    src = Path(__file__).resolve().parents[1] / "models" / "fashion_mnist_cnn.onnx"
    model, _ = normalize(load_model(src), {"input": (250, 1, 28, 28)})
    model = Pipeline(NORMALIZE).run(model).model
    xc, _ = fashion_mnist.load("train", 512)
    xt, yt = fashion_mnist.load("test", 1000)

    def acc(m):
        s = OrtSession(m)
        return np.mean(np.concatenate([s.run(None, {"input": xt[i:i + 250]})[0].argmax(1)
                                       for i in range(0, 1000, 250)]) == yt)

    base = acc(model)
    got = {}
    for rec in (False, True):
        out, rep = prune(model, {"input": xc}, ratio=0.3, reconstruct=rec)
        assert rep.after["macs"] <= 0.6 * rep.before["macs"]
        got[rec] = acc(out)
    assert got[True] > got[False] + 0.05, got
    assert base - got[True] < 0.02, (base, got)
