"""The fused 1x1 expansion + depthwise kernel (targets/cpu/kernels/expand_dw.py): against
onnxruntime over shapes, strides, paddings and epilogues on each ISA, which pairs the
rewrite fuses by default, and an aarch64 build."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from onnx import helper

from conftest import compile_and_compare, compile_to, make_model
from edgec.runtime import OrtSession
from edgec.targets.cpu.kernels.expand_dw import KERNEL
from edgec.targets.cpu.rewrites.expand_dw import FUSE_MIN_BYTES

ACTS = ["none", "relu", "relu6", "silu"]
SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _act(kind, y, out, nodes, inits):
    """``out`` = ``kind``(``y``): none (an Identity), relu, relu6 (Clip 0..6) or silu
    (``y * Sigmoid(y)``)."""
    if kind == "silu":
        nodes += [helper.make_node("Sigmoid", [y], [out + "_sg"]),
                  helper.make_node("Mul", [y, out + "_sg"], [out])]
    elif kind == "relu":
        nodes.append(helper.make_node("Relu", [y], [out]))
    elif kind == "relu6":
        inits.update({"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
        nodes.append(helper.make_node("Clip", [y, "lo", "hi"], [out]))
    else:
        nodes.append(helper.make_node("Identity", [y], [out]))


def block(cin, c, h, w, k=3, stride=1, pads=(1, 1, 1, 1), act1="relu6", act2="relu6",
          bias=True, batch=1, seed=0, extra_reader=False):
    """``x -> Conv 1x1 (cin -> c) -> act1 -> depthwise k x k / stride -> act2``, random
    weights; ``extra_reader``: the expanded map is also a graph output."""
    rng = np.random.default_rng(seed)
    inits = {"W1": (rng.standard_normal((c, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32),
             "W2": (rng.standard_normal((c, 1, k, k)) / k).astype(np.float32)}
    ins1, ins2 = ["x", "W1"], ["e", "W2"]
    if bias:
        inits["B1"] = rng.standard_normal(c).astype(np.float32)
        inits["B2"] = rng.standard_normal(c).astype(np.float32)
        ins1.append("B1")
        ins2.append("B2")
    nodes = [helper.make_node("Conv", ins1, ["p"])]
    _act(act1, "p", "e", nodes, inits)
    nodes.append(helper.make_node("Conv", ins2, ["d"], group=c, strides=[stride] * 2,
                                  pads=list(pads)))
    _act(act2, "d", "y", nodes, inits)
    oh = (h + pads[0] + pads[2] - k) // stride + 1
    ow = (w + pads[1] + pads[3] - k) // stride + 1
    outs = [("y", [batch, c, oh, ow])] + ([("e", [batch, c, h, w])] if extra_reader else [])
    return make_model(nodes, [("x", [batch, cin, h, w])], outs, inits)


@SETTINGS
@given(cin=st.integers(1, 24), c=st.integers(1, 40), h=st.integers(3, 20),
       w=st.integers(3, 70), k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]),
       pads=st.tuples(*[st.integers(0, 2)] * 4), act1=st.sampled_from(ACTS),
       act2=st.sampled_from(ACTS), bias=st.booleans(),
       batch=st.integers(1, 2), mcpu=st.sampled_from([None, "haswell"]))
@example(cin=16, c=96, h=24, w=56, k=3, stride=2, pads=(1, 1, 1, 1), act1="relu6",
         act2="relu6", bias=True, batch=1, mcpu=None)  # MobileNetV2's pair, fewer rows
@example(cin=3, c=5, h=9, w=67, k=5, stride=2, pads=(0, 2, 1, 0), act1="relu",
         act2="none", bias=False, batch=2, mcpu="haswell")  # odd width, asymmetric pads
@example(cin=16, c=24, h=20, w=40, k=3, stride=2, pads=(1, 1, 1, 1), act1="silu",
         act2="silu", bias=True, batch=1, mcpu=None)  # EfficientNet's SiLU blocks
def test_fused_expand_depthwise(tmp_path_factory, monkeypatch, cin, c, h, w, k, stride,
                                pads, act1, act2, bias, batch, mcpu):
    """Every pair fused (EDGEC_FUSE_DW=force): the kernel against onnxruntime (rtol 1e-4;
    SiLU through a polynomial exp),
    the even and odd columns of a stride-2 row split by shuffles and one by one, the
    padding of the depthwise convolution zero after the expansion's bias and clamp."""
    if h + pads[0] + pads[2] < k or w + pads[1] + pads[3] < k:
        return
    monkeypatch.setenv("EDGEC_FUSE_DW", "force")
    m = block(cin, c, h, w, k, stride, pads, act1, act2, bias, batch, seed=cin + c + w)
    report = compile_and_compare(m, tmp_path_factory.mktemp("xdw") / "art",
                                 target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"] == {KERNEL: 1}, report["kernels"]


def _fused(tmp_path, m, name) -> bool:
    report = compile_and_compare(m, tmp_path / name)
    return report["kernels"]["counts"].get(KERNEL, 0) == 1


def test_fused_only_over_large_maps(tmp_path):
    """By default only a pair whose expanded map reaches FUSE_MIN_BYTES is fused
    (MobileNetV2's 16 -> 96 at 112 x 112, 4.8 MB; not its 24 -> 144 at 56 x 56, 1.8 MB),
    and none with a SiLU."""
    assert 96 * 112 * 112 * 4 >= FUSE_MIN_BYTES > 144 * 56 * 56 * 4
    assert _fused(tmp_path, block(16, 96, 112, 112, stride=2), "big")
    assert not _fused(tmp_path, block(24, 144, 56, 56, stride=2), "small")
    # SiLU (EfficientNet) only when forced: it lost fused
    assert not _fused(tmp_path, block(16, 96, 112, 112, stride=2, act1="silu"), "silu")


def test_not_fused_when_the_expansion_is_read_elsewhere(tmp_path, monkeypatch):
    """An expanded map that is also a graph output (or read by another layer) must be
    written: the pair stays two kernels, and the outputs stay right."""
    monkeypatch.setenv("EDGEC_FUSE_DW", "force")
    assert not _fused(tmp_path, block(8, 16, 10, 10, extra_reader=True), "two")
    monkeypatch.setenv("EDGEC_FUSE_DW", "0")
    assert not _fused(tmp_path, block(8, 16, 10, 10), "off")


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_builds_for_aarch64(tmp_path, monkeypatch, stride):
    """The fused kernel for a NEON target (4 lanes): the stride-2 shuffles of 4-lane
    vectors, odd channel counts."""
    monkeypatch.setenv("EDGEC_FUSE_DW", "force")
    report = compile_to(block(6, 10, 12, 19, stride=stride), tmp_path / "arm", target="rpi4")
    assert report["kernels"]["counts"] == {KERNEL: 1}, report["kernels"]


@pytest.mark.parametrize("stride,act2", [(1, "silu"), (2, "relu6")])
def test_fused_on_the_emulated_board(rpc_board, tmp_path, monkeypatch, stride, act2):
    """The NEON build run on the emulated aarch64 board (over RPC) against onnxruntime: an
    odd width, 4-lane shuffles of the stride-2 rows, the polynomial SiLU."""
    from edgec.runtime.remote import RemoteSession

    monkeypatch.setenv("EDGEC_FUSE_DW", "force")
    m = block(6, 10, 12, 19, stride=stride, act1="relu6", act2=act2, seed=stride)
    report = compile_to(m, tmp_path / "arm", target="rpi4")
    assert report["kernels"]["counts"] == {KERNEL: 1}, report["kernels"]
    x = np.random.default_rng(stride).standard_normal((1, 6, 12, 19)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    got = RemoteSession(tmp_path / "arm", rpc_board.address, "rpi4").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
