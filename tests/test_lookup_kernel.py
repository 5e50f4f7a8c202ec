"""The reuse-lookup kernel (targets/cpu/kernels/lut.py): Gemm / MatMul whose weights take at
most 16 distinct values, against onnxruntime on the same model, AVX-512 and AVX2 by -mcpu."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper

from conftest import compile_to, host_has, make_model
from edgec.runtime import OrtSession, Session
from edgec.targets.cpu.kernels import lut as LT

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _gemm(rng, rows, k, n, values, trans_b=1, relu=False, bias=True):
    code = rng.standard_normal(values).astype(np.float32)
    w = code[rng.integers(0, values, (n, k))]
    inits = {"G": w if trans_b else np.ascontiguousarray(w.T)}
    ins = ["x", "G"]
    if bias:
        inits["C"] = rng.standard_normal(n).astype(np.float32)
        ins.append("C")
    nodes = [helper.make_node("Gemm", ins, ["y"], transB=trans_b)]
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    return make_model(nodes, [("x", [rows, k])], [("z" if relu else "y", [rows, n])], inits)


def _check(m, out, x, **kw):
    report = compile_to(m, out, **kw)
    ref = OrtSession(m).run(None, {"x": x})[0]
    got = Session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))
    return report


@SETTINGS
@given(rows=st.integers(1, 4), k=st.integers(1, 70), n=st.integers(1, 200),
       values=st.integers(1, 16), trans_b=st.integers(0, 1), relu=st.booleans(),
       bias=st.booleans(), mcpu=st.sampled_from([None, "haswell"]), force=st.booleans())
def test_lookup_matches_onnxruntime(tmp_path_factory, rows, k, n, values, trans_b, relu, bias,
                                    mcpu, force):
    rng = np.random.default_rng(rows * 131 + k * 7 + n)
    m = _gemm(rng, rows, k, n, values, trans_b, relu, bias)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        if force:  # the lookup kernel also where the dense one is faster
            mp.setenv("EDGEC_LOOKUP", "force")
        report = _check(m, tmp_path_factory.mktemp("lut") / "art", x,
                        target_options={"mcpu": mcpu} if mcpu else {})
    (layer,) = report["kernels"]["structured"]
    g = LT.group_size(layer["distinct_values"])
    lanes = 8 if mcpu == "haswell" or not host_has("avx512f") else 16
    if not force and 4 * n * k <= LT.DENSE_BYTES[lanes].get(g, 0):  # lookups of < 4 weights
        assert layer["kernel"] == "dense" and f"{lanes}-lane lookup" in layer["reason"], layer
    elif 16 * g * -(-k // g) * LT.MIN_SAVING > n * k:  # the tables would cost too much
        assert layer["kernel"] == "dense" and "multiplies" in layer["reason"], layer
    else:
        assert layer["kernel"] == "lookup", layer
        assert layer["multiplies_executed"] * LT.MIN_SAVING <= layer["multiplies_dense"]


@pytest.mark.parametrize("rows,n,cores", [(1, 1024, 2), (3, 200, 2), (4, 130, 3), (2, 64, 5),
                                          (1, 300, 1)])
def test_lookup_chunks_build_their_own_tables(rows, n, cores):
    """The output tiles are split into the target's cores' worth of parallel chunks (a
    divisor of the tile count), each building the tables of its rows itself: the tables are
    allocated inside the parallel loop (one shared table, written by one core and read by
    the other, ran 2x slower on 2 cores). Results against numpy for each split, built for
    the host's ISA."""
    import tvm

    lanes = 16 if host_has("avx512f") else 8
    rng = np.random.default_rng(n)
    code = rng.standard_normal(4).astype(np.float32)
    w = code[rng.integers(0, 4, (n, 40))]
    cb = LT.codebook(w, lanes)
    tiles = rows * cb.packed.shape[0]
    chunks = max(c for c in range(1, min(cores, tiles) + 1) if tiles % c == 0)
    f = LT.lut_func((rows, 40), (rows, n), cb, lanes, cores=cores)
    text = f.script()
    head, _, tiles_loop = text.partition(f"for ch in T.parallel({chunks}):")
    assert tiles_loop and "T.parallel" not in head + tiles_loop
    assert "table = T.alloc_buffer" in tiles_loop.split("for tt in")[0]
    mcpu = "skylake-avx512" if lanes == 16 else "haswell"
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    x = rng.standard_normal((rows, 40)).astype(np.float32)
    bias = np.zeros(cb.packed.shape[0] * cb.packed.shape[2], np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, cb.coef, cb.packed, bias,
                                            np.zeros((rows, n), np.float32))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x @ w.T, rtol=1e-5, atol=1e-5)


def test_multiplies_and_size(tmp_path):
    """1024 x 1024 with 4 values, built for AVX-512 (run where the host has it): tables of
    16 entries per pair of inputs (2 * 16 * 512 multiplies) instead of 1024 * 1024, 2 bits
    per weight in the library. Where the dense kernel is faster, it is taken and says why."""
    rng = np.random.default_rng(0)
    m = _gemm(rng, 1, 1024, 1024, 4)
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    opts = {"target_options": {"mcpu": "skylake-avx512"}}
    report = (_check(m, tmp_path / "art", x, **opts) if host_has("avx512f")
              else compile_to(m, tmp_path / "art", **opts))
    (layer,) = report["kernels"]["structured"]
    assert layer["multiplies_dense"] == 1024 * 1024
    assert layer["multiplies_executed"] == 2 * 16 * 512
    assert layer["weight_bytes"] <= layer["dense_bytes"] / 15
    assert "lookup" in "".join(report["kernels"]["functions"].values())
    # AVX2 with 2 weights per 8-lane lookup: the dense kernel up to 3 MiB of dense weights
    # (here 768 x 1024), the lookup kernel past it (1024 x 1024)
    small = compile_to(_gemm(rng, 1, 1024, 768, 4), tmp_path / "small",
                       target_options={"mcpu": "haswell"})
    (layer,) = small["kernels"]["structured"]
    assert layer["kernel"] == "dense" and "2 weights per 8-lane lookup" in layer["reason"]
    (layer,) = _check(m, tmp_path / "avx2", x,
                      target_options={"mcpu": "haswell"})["kernels"]["structured"]
    assert layer["kernel"] == "lookup", layer
    # AVX-512 with 16 values (1 weight per lookup): dense up to 3 MiB
    many = compile_to(_gemm(rng, 1, 512, 512, 16), tmp_path / "many",
                      target_options={"mcpu": "skylake-avx512"})
    (layer,) = many["kernels"]["structured"]
    assert layer["kernel"] == "dense" and "1 weights per 16-lane lookup" in layer["reason"]


def test_matmul_3d_and_what_stays_dense(tmp_path):
    rng = np.random.default_rng(1)
    code = rng.standard_normal(2).astype(np.float32)  # 2 values: the kernel on either ISA
    w = code[rng.integers(0, 2, (24, 100))]
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", [1, 3, 24])],
                   [("y", [1, 3, 100])], {"W": w})
    x = rng.standard_normal((1, 3, 24)).astype(np.float32)
    (layer,) = _check(m, tmp_path / "a", x)["kernels"]["structured"]
    assert layer["kernel"] == "lookup"
    # more rows than the kernel pays for, 17 values, an aarch64 target: dense, with reasons
    big = _gemm(rng, 8, 32, 160, 4)
    (layer,) = _check(big, tmp_path / "b", rng.standard_normal((8, 32)).astype(np.float32)
                      )["kernels"]["structured"]
    assert layer["kernel"] == "dense" and "batch rows" in layer["reason"]
    many = _gemm(rng, 1, 64, 16, 17)
    rep = _check(many, tmp_path / "c", rng.standard_normal((1, 64)).astype(np.float32))
    assert "structured" not in rep["kernels"]
    arm = compile_to(_gemm(rng, 1, 32, 160, 4), tmp_path / "d", target="rpi4")
    (layer,) = arm["kernels"]["structured"]
    assert layer["kernel"] == "dense" and "ISA" in layer["reason"]


def test_codebook_packing_roundtrip():
    rng = np.random.default_rng(2)
    for kc in (1, 2, 3, 4, 5, 16):
        code = rng.standard_normal(kc).astype(np.float32)
        w = code[rng.integers(0, kc, (37, 23))]
        cb = LT.codebook(w, 16)
        assert cb.count == len(np.unique(w)) and kc ** cb.group <= 16 or kc == 1
        vals = np.sort(np.unique(w))
        tiles, pairs, width = cb.packed.shape
        codes = np.zeros((2 * pairs, tiles * width), np.int64)
        flat = cb.packed.transpose(1, 0, 2).reshape(pairs, -1).astype(np.int64)
        codes[0::2], codes[1::2] = flat & 15, flat >> 4
        for o in range(37):
            for k in range(23):
                j, i = divmod(k, cb.group)
                digit = (codes[j, o] // cb.count ** i) % cb.count
                assert vals[digit] == w[o, k]
    assert LT.codebook(rng.standard_normal((4, 5)).astype(np.float32), 16) is None  # 20 values
    assert LT.codebook(np.arange(17, dtype=np.float32).reshape(1, 17), 16) is None


@pytest.mark.parametrize("values,mcpu", [(2, "haswell"), (4, "skylake-avx512")])
def test_lookup_with_relu6_and_zero_codeword(tmp_path, values, mcpu):
    """A codebook that holds 0 (weights both sparse and shared): the lookup kernel, exact
    (AVX2 with 2 values; AVX-512 with 4, run where the host has it)."""
    if mcpu == "skylake-avx512" and not host_has("avx512f"):
        pytest.skip("AVX-512 build: this host cannot run it")
    rng = np.random.default_rng(3)
    code = np.concatenate([[0.0], rng.standard_normal(values - 1)]).astype(np.float32)
    w = code[rng.integers(0, values, (140, 50))]
    inits = {"G": w, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    m = make_model([helper.make_node("Gemm", ["x", "G"], ["y"], transB=1),
                    helper.make_node("Clip", ["y", "lo", "hi"], ["z"])],
                   [("x", [2, 50])], [("z", [2, 140])], inits, opset=14)
    rep = _check(m, tmp_path / "a", rng.standard_normal((2, 50)).astype(np.float32) * 3,
                 target_options={"mcpu": mcpu})
    (layer,) = rep["kernels"]["structured"]
    assert layer["kernel"] == "lookup"
