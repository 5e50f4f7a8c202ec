"""Concatenations without a copy (targets/cpu/rewrites/concat_inplace.py): producers
write into their slices of the output. Each model is checked against onnxruntime, and the
report says whether the copy was removed -- where it must not be (an input read after the
concatenation, unaligned or non-contiguous slices, an input no kernel wrote), it stays and
the numbers still match."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import helper

from conftest import compile_and_compare, compile_to, make_model
from edgec.targets.cpu.rewrites.concat_inplace import accept_offset


def _conv(rng, name, x, ic, oc, k, inits, relu=True):
    inits[f"{name}_w"] = (rng.standard_normal((oc, ic, k, k)) * 0.2).astype(np.float32)
    inits[f"{name}_b"] = rng.standard_normal(oc).astype(np.float32)
    node = [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"],
                             pads=[k // 2] * 4)]
    if relu:
        node.append(helper.make_node("Relu", [f"{name}_c"], [name]))
        return node
    node[0].output[0] = name
    return node


def _check(model, tmp, target_options=None):
    return compile_and_compare(model, tmp / "a", seed=5,
                               target_options=target_options or {})["kernels"]


def _fire(squeeze, expand, hw, branches=(1, 3), tail=True):
    """x -> 1x1 squeeze -> expand branches (kernel sizes) -> Concat [-> 1x1 conv]."""
    rng = np.random.default_rng(squeeze * 100 + expand)
    inits: dict = {}
    nodes = _conv(rng, "s", "x", 8, squeeze, 1, inits)
    names = []
    for i, k in enumerate(branches):
        nodes += _conv(rng, f"e{i}", "s", squeeze, expand, k, inits)
        names.append(f"e{i}")
    nodes.append(helper.make_node("Concat", names, ["cat"], axis=1))
    total = expand * len(branches)
    out = "cat"
    if tail:
        nodes += _conv(rng, "t", "cat", total, 16, 1, inits)
        out = "t"
    return make_model(nodes, [("x", [1, 8, hw, hw])],
                      [(out, [1, 16 if tail else total, hw, hw])], inits)


@pytest.mark.parametrize("squeeze,expand,hw,branches,tail", [
    (16, 64, 13, (1, 3), True),         # SqueezeNet's fire module at 13 x 13 (odd map)
    (8, 16, 7, (1, 3, 5), True),        # three branches, Inception-like
    (8, 32, 28, (3, 1), False),         # the concatenation is the model's output
])
@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
def test_fire_module_concat_written_in_place(tmp_path, squeeze, expand, hw, branches, tail,
                                            mcpu):
    k = _check(_fire(squeeze, expand, hw, branches, tail), tmp_path,
               {"mcpu": mcpu} if mcpu else None)
    assert k["concat_views"] == 1, k
    assert "concat" not in k["counts"], k["counts"]


def test_concat_along_rows_written_in_place(tmp_path):
    """Axis 2 with one channel: the slices are still contiguous (8 rows x 16 = 512 bytes)."""
    rng = np.random.default_rng(1)
    inits: dict = {}
    nodes = _conv(rng, "a", "x", 3, 1, 3, inits) + _conv(rng, "b", "x", 3, 1, 1, inits)
    nodes.append(helper.make_node("Concat", ["a", "b"], ["y"], axis=2))
    k = _check(make_model(nodes, [("x", [1, 3, 8, 16])], [("y", [1, 1, 16, 16])], inits),
               tmp_path)
    assert k["concat_views"] == 1, k


def _pool(src, dst, k=3):
    return helper.make_node("MaxPool", [src], [dst], kernel_shape=[k, k], pads=[k // 2] * 4,
                            strides=[1, 1])


def _unet_step():
    """A skip connection: ``a`` is read by the down path (MaxPool) before the Concat."""
    rng = np.random.default_rng(7)
    inits = {"sc": np.array([1, 1, 2, 2], np.float32)}
    nodes = _conv(rng, "a", "x", 4, 16, 3, inits)
    nodes.append(helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes += _conv(rng, "d", "p", 16, 16, 3, inits)
    nodes.append(helper.make_node("Resize", ["d", "", "sc"], ["u"], mode="nearest"))
    nodes.append(helper.make_node("Concat", ["a", "u"], ["cat"], axis=1))
    nodes += _conv(rng, "t", "cat", 32, 8, 3, inits)
    return make_model(nodes, [("x", [1, 4, 16, 16])], [("t", [1, 8, 16, 16])], inits)


def _sppf():
    """YOLO's SPPF: each pooled map is read by the next pooling and by the Concat."""
    rng = np.random.default_rng(8)
    inits: dict = {}
    nodes = _conv(rng, "x1", "x", 8, 16, 1, inits)
    nodes += [_pool("x1", "y1", 5), _pool("y1", "y2", 5), _pool("y2", "y3", 5),
              helper.make_node("Concat", ["x1", "y1", "y2", "y3"], ["cat"], axis=1)]
    nodes += _conv(rng, "t", "cat", 64, 16, 1, inits)
    return make_model(nodes, [("x", [1, 8, 10, 10])], [("t", [1, 16, 10, 10])], inits)


def _c2f():
    """YOLOv8's C2f: both halves of a Split (one call, two outputs) and a bottleneck on the
    second half are concatenated."""
    rng = np.random.default_rng(9)
    inits = {"sp": np.array([16, 16], np.int64)}
    nodes = _conv(rng, "s", "x", 8, 32, 1, inits)
    nodes.append(helper.make_node("Split", ["s", "sp"], ["s0", "s1"], axis=1))
    nodes += _conv(rng, "m", "s1", 16, 16, 3, inits)
    nodes.append(helper.make_node("Concat", ["s0", "s1", "m"], ["cat"], axis=1))
    nodes += _conv(rng, "t", "cat", 48, 16, 1, inits)
    return make_model(nodes, [("x", [1, 8, 12, 12])], [("t", [1, 16, 12, 12])], inits)


def _unet_up():
    """A U-Net decoder step: the ConvTranspose's depth-to-space writes its slice (it no longer
    fuses into the Concat) and the skip connection its own."""
    rng = np.random.default_rng(10)
    inits = {"tw": (rng.standard_normal((32, 16, 2, 2)) * 0.2).astype(np.float32),
             "tb": rng.standard_normal(16).astype(np.float32)}
    nodes = _conv(rng, "a", "x", 4, 16, 3, inits)
    nodes.append(helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes += _conv(rng, "d", "p", 16, 32, 3, inits)
    nodes += [helper.make_node("ConvTranspose", ["d", "tw", "tb"], ["u"], kernel_shape=[2, 2],
                               strides=[2, 2]),
              helper.make_node("Concat", ["a", "u"], ["cat"], axis=1)]
    nodes += _conv(rng, "t", "cat", 32, 8, 3, inits)
    return make_model(nodes, [("x", [1, 4, 16, 16])], [("t", [1, 8, 16, 16])], inits)


@pytest.mark.parametrize("build", [_unet_step, _unet_up, _sppf, _c2f],
                         ids=["skip", "unet_up", "sppf", "c2f"])
def test_inputs_read_before_the_concat_are_written_in_place(tmp_path, build):
    k = _check(build(), tmp_path)
    assert k["concat_views"] == 1, k
    assert "concat" not in k["counts"], k["counts"]


def _pair(c0, c1, hw, batch=1, extra_use=False, input_slice=False):
    rng = np.random.default_rng(c0 + c1)
    inits: dict = {}
    nodes = _conv(rng, "a", "x", 4, c0, 3, inits)
    if input_slice:
        names, shapes = ["a", "z"], [("x", [batch, 4, hw, hw]), ("z", [batch, c1, hw, hw])]
    else:
        nodes += _conv(rng, "b", "x", 4, c1, 1, inits)
        names, shapes = ["a", "b"], [("x", [batch, 4, hw, hw])]
    nodes.append(helper.make_node("Concat", names, ["y"], axis=1))
    outs = [("y", [batch, c0 + c1, hw, hw])]
    if extra_use:  # "a" is read again after the concatenation (with its output)
        inits.update({"st": np.array([0], np.int64), "en": np.array([c0], np.int64),
                      "ax": np.array([1], np.int64)})
        nodes += [helper.make_node("Slice", ["y", "st", "en", "ax"], ["ys"]),
                  helper.make_node("Mul", ["a", "ys"], ["g"])]
        outs.append(("g", [batch, c0, hw, hw]))
    return make_model(nodes, shapes, outs, inits)


@pytest.mark.parametrize("case", ["read_after", "unaligned", "batch2", "model_input"])
def test_concat_keeps_its_copy_where_it_must(tmp_path, case):
    model = {"read_after": lambda: _pair(16, 16, 8, extra_use=True),
             "unaligned": lambda: _pair(3, 5, 5),          # slice 1 starts at 300 bytes
             "batch2": lambda: _pair(16, 16, 8, batch=2),   # slices not contiguous
             "model_input": lambda: _pair(16, 16, 8, input_slice=True)}[case]()
    k = _check(model, tmp_path)
    assert k["concat_views"] == 0, k
    assert k["counts"].get("concat") == 1, k["counts"]


def test_shared_producer_runs_at_an_offset_and_at_zero(tmp_path):
    """One fused function writes a concatenation's second slice and, elsewhere, a tensor of
    its own: the offset-taking form serves both."""
    rng = np.random.default_rng(2)
    inits: dict = {}
    nodes = (_conv(rng, "a", "x", 4, 16, 3, inits) + _conv(rng, "b", "x", 4, 16, 1, inits)
             + _conv(rng, "c", "x", 4, 16, 1, inits))
    nodes += [helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
              helper.make_node("Sigmoid", ["c"], ["g"])]
    k = _check(make_model(nodes, [("x", [1, 4, 8, 8])],
                          [("y", [1, 32, 8, 8]), ("g", [1, 16, 8, 8])], inits), tmp_path)
    assert k["concat_views"] == 1, k


def test_accept_offset_reads_the_view_offset():
    from tvm import te

    a = te.placeholder((1, 2, 4, 4), name="A")
    b = te.compute(a.shape, lambda *i: a(*i) + 1.0, name="B")
    func = accept_offset(te.create_prim_func([a, b]), 1)
    lib = tvm.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                    target="llvm")
    view = tvm.get_global_func("runtime.TVMTensorCreateView")
    big = tvm.runtime.tensor(np.zeros((1, 6, 4, 4), np.float32))
    src = tvm.runtime.tensor(np.ones((1, 2, 4, 4), np.float32))
    lib["main"](src, view(big, tvm.runtime.ShapeTuple([1, 2, 4, 4]), "float32", 2 * 16 * 4))
    lib["main"](src, view(big, tvm.runtime.ShapeTuple([1, 2, 4, 4]), "float32", 0))
    np.testing.assert_array_equal(big.numpy()[0, :, 0, 0], [2, 2, 2, 2, 0, 0])
    with pytest.raises(Exception, match="align|offset"):  # not a multiple of 64 bytes
        lib["main"](src, view(big, tvm.runtime.ShapeTuple([1, 2, 4, 4]), "float32", 4))


@pytest.mark.parametrize("target", ["rpi4", "arm64"])
def test_concat_in_place_builds_for_aarch64(tmp_path, target):
    report = compile_to(_fire(16, 32, 13), tmp_path / "a", target=target)
    assert report["kernels"]["concat_views"] == 1, report["kernels"]


def test_concat_in_place_runs_on_emulated_board(tmp_path, rpc_board):
    """The views (the VM's tensor view builtin, kernels taking offsets) on the TVM runtime
    alone: the aarch64 build of a fire module on the emulated rpi4 board."""
    from edgec.runtime import OrtSession
    from edgec.runtime.remote import RemoteSession

    m = _fire(16, 32, 13)
    report = compile_to(m, tmp_path / "arm", target="rpi4")
    assert report["kernels"]["concat_views"] == 1, report["kernels"]
    x = np.random.default_rng(1).standard_normal((1, 8, 13, 13)).astype(np.float32)
    got = RemoteSession(tmp_path / "arm", rpc_board.address, "rpi4").run(None, {"x": x})[0]
    ref = OrtSession(m).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

