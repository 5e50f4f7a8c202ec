"""NaN passes through the fused Relu / Clip epilogues as in onnxruntime (a NaN image used to
give finite logits: Relu turned NaN into 0, Clip into its bounds)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from conftest import compile_to, make_model
from edgec.runtime import OrtSession, Session

RNG = np.random.default_rng(0)


def _w(*shape):
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


# (kernel expected, nodes, input shape, output shape, initializers)
CASES = {
    "packed": ("conv2d-packed", [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4),
                                 helper.make_node("Relu", ["y"], ["z"])],
               [1, 8, 12, 12], [1, 16, 12, 12], {"W": _w(16, 8, 3, 3)}),
    "winograd": ("conv2d-winograd", [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4),
                                     helper.make_node("Relu", ["y"], ["z"])],
                 [1, 64, 28, 28], [1, 64, 28, 28], {"W": _w(64, 64, 3, 3)}),
    "pixels": ("conv2d-px", [helper.make_node("Conv", ["x", "W"], ["y"]),
                             helper.make_node("Relu", ["y"], ["z"])],
               [1, 16, 8, 16], [1, 32, 8, 16], {"W": _w(32, 16, 1, 1)}),
    "depthwise": ("dwconv2d", [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4,
                                                group=16),
                               helper.make_node("Relu", ["y"], ["z"])],
                  [1, 16, 12, 12], [1, 16, 12, 12], {"W": _w(16, 1, 3, 3)}),
    "maxpool": ("maxpool2d", [helper.make_node("Relu", ["x"], ["y"]),
                              helper.make_node("MaxPool", ["y"], ["z"], kernel_shape=[2, 2],
                                               strides=[2, 2])],
                [1, 8, 12, 12], [1, 8, 6, 6], {}),
    "packed-relu6": ("conv2d-packed", [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4),
                                       helper.make_node("Clip", ["y", "lo", "hi"], ["z"])],
                     [1, 8, 12, 12], [1, 16, 12, 12],
                     {"W": _w(16, 8, 3, 3), "lo": np.float32(0), "hi": np.float32(6)}),
    "depthwise-relu6": ("dwconv2d", [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4,
                                                      group=16),
                                     helper.make_node("Clip", ["y", "lo", "hi"], ["z"])],
                        [1, 16, 12, 12], [1, 16, 12, 12],
                        {"W": _w(16, 1, 3, 3), "lo": np.float32(0), "hi": np.float32(6)}),
    "gemm": ("dense-packed", [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1),
                        helper.make_node("Relu", ["y"], ["z"])],
             [4, 64], [4, 32], {"W": _w(32, 64)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nan_propagates_through_epilogues(tmp_path, case):
    kind, nodes, ishape, oshape, inits = CASES[case]
    m = make_model(nodes, [("x", ishape)], [("z", oshape)], inits)
    report = compile_to(m, tmp_path / "a")
    assert any(k.startswith(kind) for k in report["kernels"]["counts"]), report["kernels"]
    x = RNG.standard_normal(ishape).astype(np.float32)
    x.flat[len(x.flat) // 3] = np.nan
    got = Session(tmp_path / "a").run(None, {"x": x})[0]
    ref = OrtSession(m).run(None, {"x": x})[0]
    if case == "maxpool":  # onnxruntime's MaxPool drops a NaN against real values; so do we
        assert not np.isnan(ref).any()
    else:
        assert np.isnan(ref).any()
    if case == "winograd":
        # a NaN reaches every output of the transformed tiles it falls in (more than the
        # 3x3 neighbourhood of the direct convolution): never fewer NaN than onnxruntime
        assert np.isnan(got)[np.isnan(ref)].all()
        ok = ~np.isnan(got)
    else:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-4)
