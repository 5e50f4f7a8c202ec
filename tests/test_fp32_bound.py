"""The fp32 error of the fast paths stays within 1e-4 of the largest output (issue 21, item
9), measured against a float64 reference: a deep chain of 3x3 convolutions on a map large
enough for Winograd F(4, 3) (its transforms lose the most bits of every kernel), and
sigmoid/tanh through the polynomial ``fast_exp``/``fast_tanh``."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from numpy.lib.stride_tricks import sliding_window_view

from conftest import compile_to, make_model
from edgec.runtime import Session


def _conv64(a, w, b):
    win = sliding_window_view(np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("nchwij,kcij->nkhw", win, w) + b[None, :, None, None]


def test_deep_winograd_chain_within_1e_4(tmp_path):
    rng = np.random.default_rng(0)
    c, hw, layers = 32, 64, 10
    nodes, inits, x = [], {}, "x"
    for i in range(layers):
        inits[f"W{i}"] = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))
                          ).astype(np.float32)
        inits[f"B{i}"] = (rng.standard_normal(c) * 0.1).astype(np.float32)
        act = "Relu" if i % 3 else ("Sigmoid" if i % 2 else "Tanh")
        nodes += [helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node(act, [f"c{i}"], [f"a{i}"])]
        x = f"a{i}"
    m = make_model(nodes, [("x", [1, c, hw, hw])], [(x, [1, c, hw, hw])], inits)
    report = compile_to(m, tmp_path / "art")
    assert any(k.startswith("conv2d-winograd-f4") for k in report["kernels"]["counts"]), \
        report["kernels"]["counts"]
    xin = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    got = Session(tmp_path / "art").run(None, {"x": xin})[0]
    a = xin.astype(np.float64)
    for i in range(layers):
        a = _conv64(a, inits[f"W{i}"].astype(np.float64), inits[f"B{i}"].astype(np.float64))
        a = np.maximum(a, 0) if i % 3 else (1 / (1 + np.exp(-a)) if i % 2 else np.tanh(a))
    err = np.abs(got - a).max() / np.abs(a).max()
    print(f"deep Winograd F(4, 3) chain: {err:.2e} of the largest output")
    assert err <= 1e-4, err


@pytest.mark.parametrize("mcpu", ["skylake-avx512", "haswell"])
def test_fast_exp_relative_error_and_specials(mcpu):
    """The polynomial exp of the sigmoid (SiLU) epilogues: within 3e-7 relative of exp over
    [-87, 88] (float64 reference); beyond, the clamps' values (~1.6e38 and ~1.6e-38, where
    float32 overflows / underflows), +inf and NaN kept; vectorized for the ISA (built, and
    run where the host has it)."""
    import tvm
    from tvm import te

    from edgec.targets.cpu.compute import fast_exp
    from conftest import host_has

    x = np.concatenate([np.linspace(-87, 88, 200_003, dtype=np.float32),
                        np.array([0, -0.0, 1e-30, -1e-30, 100, -100, np.inf, -np.inf, np.nan],
                                 np.float32)])
    n = x.size
    xp = te.placeholder((n,), name="x")
    y = te.compute((n,), lambda i: fast_exp(xp[i]), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([xp, y]).with_attr("global_symbol", "main"))
    (i,) = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(i, [None, 8])[1])
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    if mcpu == "skylake-avx512" and not host_has("avx512f"):
        return
    out = tvm.runtime.tensor(np.zeros(n, np.float32), tvm.cpu())
    lib(tvm.runtime.tensor(x, tvm.cpu()), out)
    got, ref = out.numpy(), np.exp(x.astype(np.float64))
    body = slice(0, 200_003)
    assert np.max(np.abs(got[body] - ref[body]) / ref[body]) < 3e-7
    tail = got[200_003:]
    assert tail[0] == tail[1] == 1.0 and abs(tail[2] - 1) < 1e-7 and abs(tail[3] - 1) < 1e-7
    assert tail[4] > 1e38 and tail[6] == np.inf
    assert 0 < tail[5] < 1e-37 and 0 < tail[7] < 1e-37
    assert np.isnan(tail[8])
